"""Digest authentication (RFC 7616 semantics, RFC 8760 algorithms) with a hand-driven clock."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.config import Account
from appliance.sip.digest import (
    DigestAuthenticator,
    answer_challenge,
    compute_ha1,
    parse_challenge,
    parse_credentials,
)
from media_core.sip import parse_message

REALM = "edgecc.test"
PASSWORD = "s3cret-1001"
SECRET = b"k" * 32


def account(user: str, password: str, realm: str = REALM) -> Account:
    return Account(
        user=user,
        ha1_md5=hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest(),
        ha1_sha256=hashlib.sha256(f"{user}:{realm}:{password}".encode()).hexdigest(),
    )


def authenticator(ttl: float = 300.0, **kw) -> DigestAuthenticator:
    return DigestAuthenticator(
        REALM, {"1001": account("1001", PASSWORD)}, nonce_ttl=ttl, secret=SECRET, **kw
    )


def register(
    *auth_values: str,
    uri: str = "sip:edgecc.test",
    header: str = "Authorization",
    user: str = "1001",
    user_agent: str | None = None,
) -> object:
    lines = [
        f"REGISTER {uri} SIP/2.0",
        "Via: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK776asdhds",
        "Max-Forwards: 70",
        f"To: <sip:{user}@edgecc.test>",
        f"From: <sip:{user}@edgecc.test>;tag=1928301774",
        *([f"User-Agent: {user_agent}"] if user_agent else []),
        "Call-ID: a84b4c76e66710@192.0.2.10",
        "CSeq: 2 REGISTER",
        "Contact: <sip:1001@192.0.2.10:5060>",
        *(f"{header}: {v}" for v in auth_values),
        "Content-Length: 0",
        "",
        "",
    ]
    return parse_message("\r\n".join(lines).encode())


def client_answer(challenge: str, *, user="1001", password=PASSWORD, nc=1, uri="sip:edgecc.test"):
    """The client side, computed here straight from RFC 7616 §3.4.1."""
    p = parse_challenge(challenge)
    h = hashlib.sha256 if p["algorithm"] == "SHA-256" else hashlib.md5

    def hx(s: str) -> str:
        return h(s.encode()).hexdigest()

    cnonce, nc_text = "0a4f113b", f"{nc:08x}"
    ha1 = hx(f"{user}:{p['realm']}:{password}")
    response = hx(f"{ha1}:{p['nonce']}:{nc_text}:{cnonce}:auth:{hx('REGISTER:' + uri)}")
    return (
        f'Digest username="{user}", realm="{p["realm"]}", nonce="{p["nonce"]}", uri="{uri}", '
        f'response="{response}", algorithm={p["algorithm"]}, qop=auth, nc={nc_text}, '
        f'cnonce="{cnonce}"'
    )


# RFC 7616 §3.9.1: the published example (HTTP, but the same computation SIP uses).
RFC7616_EXAMPLE = {
    "SHA-256": "753927fa0e85d155564e2e272a28d1802ca10daf4496794697cf8db5856cb6c1",
    "MD5": "8ca523f5e9506fed4657c9700eebdbec",
}


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
def test_rfc7616_example_response_is_recognised_as_correct(algorithm: str) -> None:
    realm = "http-auth@example.org"
    auth = DigestAuthenticator(
        realm, {"Mufasa": account("Mufasa", "Circle of Life", realm)}, nonce_ttl=30, secret=SECRET
    )
    creds = parse_credentials(
        f'Digest username="Mufasa", realm="{realm}", uri="/dir/index.html", '
        f'algorithm={algorithm}, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
        f'nc=00000001, cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", qop=auth, '
        f'response="{RFC7616_EXAMPLE[algorithm]}", '
        f'opaque="FQhe/qaU925kfnzjCev0ciny7QMkPqMAFRtzCUYo5tdS"'
    )
    assert creds is not None
    # The response is right but the nonce is not one of ours: stale, so the client simply
    # retries with a fresh nonce. A stale answer is only ever given to a correct response.
    result = auth.verify_credentials(creds, "GET", "/dir/index.html", now=10.0)
    assert (result.user, result.stale, result.reason) == (None, True, "stale nonce")
    wrong = parse_credentials(
        f'Digest username="Mufasa", realm="{realm}", uri="/dir/index.html", '
        f'algorithm={algorithm}, nonce="7ypf/xlj9XXwfDPEoM4URrv/xwf94BcCAzFZH4GiTo0v", '
        f'nc=00000001, cnonce="f2/wE4q74E6zIJEtWaHKaf5wv/H5QzzpXusqGemxURZJ", qop=auth, '
        f'response="{"0" * len(RFC7616_EXAMPLE[algorithm])}"'
    )
    assert wrong is not None
    bad = auth.verify_credentials(wrong, "GET", "/dir/index.html", now=10.0)
    assert (bad.user, bad.stale, bad.reason, bad.attempted) == (None, False, "bad response", True)


def test_challenge_offers_sha256_then_md5_with_qop_auth_and_one_nonce() -> None:
    auth = authenticator()
    headers = auth.challenge(register(), 1.0)
    assert [name for name, _ in headers] == ["WWW-Authenticate", "WWW-Authenticate"]
    params = [parse_challenge(value) for _, value in headers]
    assert [p["algorithm"] for p in params] == ["SHA-256", "MD5"]
    assert all(p["qop"] == "auth" and p["realm"] == REALM and "stale" not in p for p in params)
    assert params[0]["nonce"] == params[1]["nonce"]
    assert auth.challenge(register(), 1.0)[0][1] != headers[0][1]  # fresh nonce each time
    stale = auth.challenge(register(), 1.0, stale=True, proxy=True)
    assert [n for n, _ in stale] == ["Proxy-Authenticate"] * 2
    assert all(parse_challenge(v)["stale"] == "true" for _, v in stale)


@pytest.mark.parametrize("index", [0, 1], ids=["SHA-256", "MD5"])
def test_correct_response_authenticates_and_nonce_count_must_grow(index: int) -> None:
    auth = authenticator()
    challenge = auth.challenge(register(), 0.0)[index][1]
    ok = auth.verify(register(client_answer(challenge, nc=1)), 1.0)
    assert (ok.user, ok.stale, ok.reason, ok.ok) == ("1001", False, "ok", True)
    # The phone reuses the nonce for its next request with nc=2 (RFC 7616 §3.4.5).
    assert auth.verify(register(client_answer(challenge, nc=2)), 2.0).user == "1001"
    for replay in (2, 1):
        result = auth.verify(register(client_answer(challenge, nc=replay)), 3.0)
        assert (result.user, result.reason, result.attempted) == (None, "nonce count replay", True)
    assert auth.verify(register(client_answer(challenge, nc=7)), 3.0).ok


def test_expired_nonce_with_correct_response_is_stale_and_wrong_one_is_not() -> None:
    auth = authenticator(ttl=30)
    challenge = auth.challenge(register(), 100.0)[0][1]
    assert auth.verify(register(client_answer(challenge)), 129.9).ok
    stale = auth.verify(register(client_answer(challenge, nc=2)), 130.1)
    assert (stale.user, stale.stale, stale.attempted) == (None, True, False)
    wrong = auth.verify(register(client_answer(challenge, nc=3, password="guess")), 130.1)
    assert (wrong.stale, wrong.reason, wrong.attempted) == (False, "bad response", True)


def test_nonces_are_stateless_but_bound_to_secret_and_time() -> None:
    auth = authenticator()
    other = DigestAuthenticator(
        REALM, {"1001": account("1001", PASSWORD)}, nonce_ttl=300, secret=b"x" * 32
    )
    # Issued by another secret (e.g. before a restart): correct password -> stale.
    challenge = other.challenge(register(), 0.0)[0][1]
    assert auth.verify(register(client_answer(challenge)), 1.0).stale
    # A nonce whose time was altered fails its MAC: also not ours.
    nonce = parse_challenge(auth.challenge(register(), 50.0)[0][1])["nonce"]
    forged = ("B" if nonce[0] != "B" else "C") + nonce[1:]
    forged_challenge = f'Digest realm="{REALM}", nonce="{forged}", algorithm=SHA-256, qop="auth"'
    assert auth.verify(register(client_answer(forged_challenge)), 51.0).stale
    # A nonce from the future (clock went backwards) is not accepted either.
    future = auth.challenge(register(), 500.0)[0][1]
    assert auth.verify(register(client_answer(future)), 400.0).stale


def test_unknown_user_looks_exactly_like_a_wrong_password() -> None:
    auth = authenticator()
    challenge = auth.challenge(register(), 0.0)[0][1]
    unknown = auth.verify(register(client_answer(challenge, user="9999")), 1.0)
    wrong = auth.verify(register(client_answer(challenge, password="nope")), 1.0)
    assert unknown == wrong
    assert (unknown.user, unknown.stale, unknown.reason, unknown.attempted) == (
        None,
        False,
        "bad response",
        True,
    )
    # Even past the nonce lifetime an unknown user never learns "stale".
    late = auth.verify(register(client_answer(challenge, user="9999", nc=2)), 1000.0)
    assert not late.stale

    # And the challenge itself does not depend on who asks.
    def shape(request) -> list[tuple[str, list[tuple[str, str | int]]]]:
        return [
            (n, [(k, len(v) if k == "nonce" else v) for k, v in parse_challenge(v).items()])
            for n, v in auth.challenge(request, 0.0)
        ]

    assert shape(register(user="1001")) == shape(register(user="9999"))


def test_md5_first_only_for_clients_that_need_it() -> None:
    auth = authenticator()
    sipp = auth.challenge(register(user_agent="SIPp/edgecc-register"), 0.0)
    assert [parse_challenge(v)["algorithm"] for _, v in sipp] == ["MD5", "SHA-256"]
    phone = auth.challenge(register(user_agent="Yealink SIP-T46U"), 0.0)
    assert [parse_challenge(v)["algorithm"] for _, v in phone] == ["SHA-256", "MD5"]
    strict = DigestAuthenticator(REALM, {}, nonce_ttl=30, secret=SECRET, md5_first_user_agents=())
    sipp_strict = strict.challenge(register(user_agent="SIPp"), 0.0)
    assert [parse_challenge(v)["algorithm"] for _, v in sipp_strict] == ["SHA-256", "MD5"]


def test_missing_foreign_and_malformed_credentials() -> None:
    auth = authenticator()
    none = auth.verify(register(), 0.0)
    assert (none.ok, none.reason, none.attempted) == (False, "no credentials", False)
    # RFC 4475 §3.3.11 regaut01: an unknown scheme is no credentials at all.
    other = auth.verify(register("NoOneKnowsThisScheme opaque-data=here"), 0.0)
    assert (other.reason, other.attempted) == ("no credentials", False)
    foreign = auth.verify(
        register('Digest username="1001", realm="elsewhere", nonce="n", uri="sip:x", response="0"'),
        0.0,
    )
    assert (foreign.reason, foreign.attempted) == ("no credentials", False)
    for bad in ('Digest username="1001", realm="edgecc.test"', 'Digest username="10, realm=x'):
        result = auth.verify(register(bad), 0.0)
        assert (result.reason, result.attempted) == ("malformed credentials", True)


def test_qop_uri_algorithm_and_nc_format_are_enforced() -> None:
    auth = authenticator()
    challenge = auth.challenge(register(), 0.0)[0][1]
    good = client_answer(challenge)
    no_qop = good.replace(", qop=auth", "")
    assert auth.verify(register(no_qop), 1.0).reason == "qop missing"
    other_uri = client_answer(challenge, uri="sip:other.test")
    assert auth.verify(register(other_uri), 1.0).reason == "uri mismatch"
    sess = good.replace("algorithm=SHA-256", "algorithm=SHA-256-sess")
    assert auth.verify(register(sess), 1.0).reason == "unsupported algorithm"
    short_nc = good.replace("nc=00000001", "nc=1")
    assert auth.verify(register(short_nc), 1.0).reason == "bad nonce count"
    assert auth.verify(register(good), 1.0).ok


def test_credentials_for_our_realm_are_found_among_several() -> None:
    auth = authenticator()
    challenge = auth.challenge(register(), 0.0)[1][1]
    other = 'Digest username="x", realm="proxy.example", nonce="a", uri="sip:a", response="b"'
    assert auth.verify(register(other, client_answer(challenge)), 1.0).ok
    proxy = auth.challenge(register(), 0.0, proxy=True)[0][1]
    req = register(client_answer(proxy), header="Proxy-Authorization")
    assert auth.verify(req, 1.0, proxy=True).ok
    assert auth.verify(req, 1.0).reason == "no credentials"


def test_parse_credentials_handles_quoting_and_limits() -> None:
    creds = parse_credentials(
        'Digest username="a\\"b", realm="r, with comma", nonce="n", uri="sip:x", '
        'response="ABCDEF", qop=auth, nc=00000001, cnonce="c"'
    )
    assert creds is not None
    assert (creds.username, creds.realm, creds.response, creds.algorithm) == (
        'a"b',
        "r, with comma",
        "abcdef",
        "MD5",
    )
    assert parse_credentials("Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==") is None
    with pytest.raises(ValueError, match="repeated"):
        parse_credentials(
            'Digest username="a", username="b", realm="r", nonce="n", uri="u", response="r"'
        )
    with pytest.raises(ValueError, match="too long"):
        parse_credentials("Digest " + "a=b, " * 2000)


def test_nonce_count_table_is_bounded_without_allowing_replay() -> None:
    auth = authenticator(max_tracked_nonces=3)
    challenges = [auth.challenge(register(), float(i))[0][1] for i in range(6)]
    for i, ch in enumerate(challenges):
        assert auth.verify(register(client_answer(ch)), 10.0 + i).ok
    assert auth.tracked_nonces <= 3
    # The first nonce's counter was forgotten: replaying it is refused as stale, never accepted.
    again = auth.verify(register(client_answer(challenges[0])), 20.0)
    assert (again.ok, again.stale) == (False, True)


def test_compute_ha1_and_answer_challenge() -> None:
    assert compute_ha1("1001", REALM, PASSWORD) == account("1001", PASSWORD).ha1_md5
    assert compute_ha1("1001", REALM, PASSWORD, "sha-256") == account("1001", PASSWORD).ha1_sha256
    with pytest.raises(ValueError):
        compute_ha1("1001", REALM, PASSWORD, "SHA-512-256")
    auth = authenticator()
    # Both challenges share one nonce, so the second answer must count on from the first.
    for nc, (_, challenge) in enumerate(auth.challenge(register(), 0.0), 1):
        value = answer_challenge(
            challenge,
            method="REGISTER",
            uri="sip:edgecc.test",
            username="1001",
            password=PASSWORD,
            nc=nc,
        )
        assert auth.verify(register(value), 1.0).user == "1001"
    with pytest.raises(ValueError):
        parse_challenge('Basic realm="x"')


def test_bad_construction_is_refused() -> None:
    with pytest.raises(ValueError):
        DigestAuthenticator(REALM, {}, nonce_ttl=300, secret=b"")
    with pytest.raises(ValueError):
        DigestAuthenticator(REALM, {}, nonce_ttl=0, secret=SECRET)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_credentials_text_parses_or_raises_value_error(text: str) -> None:
    for value in (text, "Digest " + text):
        with contextlib.suppress(ValueError):
            parse_credentials(value)


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["username", "realm", "nonce", "uri", "response", "qop", "nc", "cnonce"]),
        st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40),
        min_size=5,
    )
)
def test_quoted_parameters_round_trip(params: dict[str, str]) -> None:
    quoted = ", ".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in params.items()
    )
    try:
        creds = parse_credentials("Digest " + quoted)
    except ValueError as exc:
        assert "missing" in str(exc)
        return
    assert creds is not None
    assert creds.username == params["username"] and creds.uri == params["uri"]
    assert creds.response == params["response"].lower()
