"""The registrar (RFC 3261 §10.3) on a real site database, with a hand-driven clock."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.config import GuardConfig, SiteConfig, ha1
from appliance.sip.digest import DigestAuthenticator, answer_challenge, parse_challenge
from appliance.sip.guard import Guard, GuardVerdict
from appliance.sip.registrar import Binding, BindingStore, Registrar, contact_key
from appliance.sip.source import Source
from appliance.store import open_site_db
from media_core.sip import parse_message

REALM = "edgecc.test"
PASSWORDS = {"1001": "pw-1001-secret", "1002": "pw-1002-secret"}
PHONE = Source("UDP", "192.0.2.10", 5062)
VECTORS = Path(__file__).parent / "vectors" / "sip" / "rfc4475"
WALL0 = 1_800_000_000.0  # the wall clock at now == 0


class Clock:
    """A monotonic ``now`` driven by hand, and the wall clock that goes with it."""

    def __init__(self, wall0: float = WALL0) -> None:
        self.now = 0.0
        self.wall0 = wall0

    def wall(self) -> float:
        return self.wall0 + self.now


def site_config(**registrar) -> SiteConfig:
    accounts = []
    for user, password in PASSWORDS.items():
        md5, sha256 = ha1(user, REALM, password)
        accounts.append({"user": user, "ha1_md5": md5, "ha1_sha256": sha256})
    return SiteConfig.model_validate(
        {
            "sip": {
                "realm": REALM,
                "udp_port": 0,
                "tcp_port": 0,
                "tls_port": None,
                "accounts": accounts,
                "registrar": {
                    "min_expires": 60,
                    "max_expires": 3600,
                    "default_expires": 1800,
                    **registrar,
                },
            }
        }
    )


class Site:
    """A registrar over a real SQLite site database."""

    def __init__(
        self, directory: Path, *, wall0: float = WALL0, secret: bytes = b"s" * 32, **registrar
    ) -> None:
        self.path = directory / "edgecc.db"
        self.config = site_config(**registrar)
        self.clock = Clock(wall0)
        self.db = open_site_db(self.path)
        self.guard = Guard(GuardConfig())
        self.auth = DigestAuthenticator.from_site(self.config, secret=secret)
        self.store = self.open_store()
        self.registrar = Registrar(self.config, self.store, self.auth, self.guard)

    def open_store(self) -> BindingStore:
        return BindingStore(
            self.db, clock=lambda: self.clock.now, wall_clock=self.clock.wall, flush_interval=0
        )

    def rows(self) -> list[tuple]:
        self.store.flush()
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return conn.execute(
                "SELECT aor, contact, expires_at, call_id, cseq, received, transport "
                "FROM sip_bindings ORDER BY aor, contact"
            ).fetchall()
        finally:
            conn.close()

    def close(self) -> None:
        self.store.close()
        self.db.close()


@pytest.fixture
def site(tmp_path: Path):
    s = Site(tmp_path)
    yield s
    s.close()


def register(
    user: str = "1001",
    *,
    call_id: str = "reg-1@192.0.2.10",
    cseq: int = 1,
    contacts: tuple[str, ...] = ("<sip:1001@192.0.2.10:5062>",),
    expires: int | str | None = None,
    authorization: str | None = None,
    to: str | None = None,
    user_agent: str | None = None,
    uri: str = f"sip:{REALM}",
):
    lines = [
        f"REGISTER {uri} SIP/2.0",
        f"Via: SIP/2.0/UDP 192.0.2.10:5062;branch=z9hG4bK{call_id[:6]}{cseq}",
        "Max-Forwards: 70",
        f"To: {to or f'<sip:{user}@{REALM}>'}",
        f"From: <sip:{user}@{REALM}>;tag=ft{cseq}",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *(f"Contact: {c}" for c in contacts),
    ]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if authorization:
        lines.append(f"Authorization: {authorization}")
    if user_agent:
        lines.append(f"User-Agent: {user_agent}")
    lines += ["Content-Length: 0", "", ""]
    return parse_message("\r\n".join(lines).encode())


def challenges(response) -> list[dict[str, str]]:
    return [parse_challenge(v) for n, v in response.headers if n == "WWW-Authenticate"]


def authed(site: Site, *, password: str | None = None, source=PHONE, **kw):
    """REGISTER, take the 401's first challenge, REGISTER again with credentials."""
    user = kw.get("user", "1001")
    cseq = kw.pop("cseq", 1)
    first = site.registrar.handle_register(register(cseq=cseq, **kw), source, site.clock.now)
    assert first.status == 401, first.reason
    challenge = next(v for n, v in first.headers if n == "WWW-Authenticate")
    answer = answer_challenge(
        challenge,
        method="REGISTER",
        uri=kw.get("uri", f"sip:{REALM}"),
        username=user,
        password=password or PASSWORDS.get(user, "x"),
    )
    return site.registrar.handle_register(
        register(cseq=cseq + 1, authorization=answer, **kw), source, site.clock.now
    )


def listed(response) -> dict[str, int]:
    """Contact URI -> expires, as the 200 OK lists them."""
    return {str(c.uri): int(c.params["expires"]) for c in response.contacts}


def test_first_register_is_challenged_and_changes_nothing(site: Site) -> None:
    response = site.registrar.handle_register(register(), PHONE, 0.0)
    assert (response.status, response.to.tag is not None) == (401, True)
    assert [c["algorithm"] for c in challenges(response)] == ["SHA-256", "MD5"]
    assert site.registrar.lookup("1001", 0.0) == [] and site.rows() == []
    assert site.guard.admit(None, PHONE, 0.0) is GuardVerdict.ALLOW


def test_authenticated_register_binds_and_lists_the_contact(site: Site) -> None:
    response = authed(site, expires=120)
    assert response.status == 200
    assert listed(response) == {"sip:1001@192.0.2.10:5062": 120}
    [binding] = site.registrar.lookup("1001", 0.0)
    assert (binding.aor, binding.contact, binding.expires_at) == (
        f"sip:1001@{REALM}",
        "sip:1001@192.0.2.10:5062",
        120.0,
    )
    assert (binding.received, binding.transport, binding.call_id, binding.cseq) == (
        "192.0.2.10:5062",
        "UDP",
        "reg-1@192.0.2.10",
        2,
    )
    assert site.rows() == [
        (
            f"sip:1001@{REALM}",
            "sip:1001@192.0.2.10:5062",
            WALL0 + 120,
            "reg-1@192.0.2.10",
            2,
            "192.0.2.10:5062",
            "UDP",
        )
    ]


@pytest.mark.parametrize(
    ("contact", "header", "expected"),
    [
        ("<sip:1001@192.0.2.10:5062>", None, 1800),  # default_expires
        ("<sip:1001@192.0.2.10:5062>", 300, 300),  # Expires header
        ("<sip:1001@192.0.2.10:5062>;expires=90", 300, 90),  # the parameter wins
        ("<sip:1001@192.0.2.10:5062>;expires=86400", None, 3600),  # capped at max_expires
        ("<sip:1001@192.0.2.10:5062>", 99999999999999, 3600),  # beyond 2**32-1, still capped
    ],
)
def test_expiry_comes_from_param_then_header_then_default(site, contact, header, expected):
    response = authed(site, contacts=(contact,), expires=header)
    assert listed(response) == {"sip:1001@192.0.2.10:5062": expected}


def test_interval_too_brief_gets_423_with_min_expires_and_changes_nothing(site: Site) -> None:
    assert authed(site, expires=600).status == 200
    response = authed(
        site,
        call_id="reg-2",
        contacts=("<sip:1001@192.0.2.11>;expires=600", "<sip:1001@192.0.2.12>;expires=30"),
    )
    assert (response.status, response.get("Min-Expires")) == (423, "60")
    assert [b.contact for b in site.registrar.lookup("1001", 0.0)] == ["sip:1001@192.0.2.10:5062"]


def test_several_contacts_per_account_and_removal_of_one(site: Site) -> None:
    authed(site, contacts=("<sip:1001@192.0.2.10:5062>",), expires=600)
    site.clock.now = 100.0
    both = authed(
        site,
        call_id="desk-2",
        contacts=("<sip:1001@192.0.2.20:5060>;q=0.5", "<sip:1001@192.0.2.21:5060>"),
        expires=900,
    )
    assert listed(both) == {
        "sip:1001@192.0.2.10:5062": 500,
        "sip:1001@192.0.2.20:5060": 900,
        "sip:1001@192.0.2.21:5060": 900,
    }
    best = site.registrar.lookup("1001", 100.0)
    assert [b.contact for b in best][-1] == "sip:1001@192.0.2.20:5060"  # lowest q last
    one_gone = authed(
        site, call_id="desk-2", cseq=10, contacts=("<sip:1001@192.0.2.20:5060>",), expires=0
    )
    assert listed(one_gone) == {"sip:1001@192.0.2.10:5062": 500, "sip:1001@192.0.2.21:5060": 900}
    assert len(site.rows()) == 2
    # A query (no Contact) lists the bindings and changes nothing (RFC 3261 §10.2.3).
    query = authed(site, call_id="query-1", contacts=())
    assert listed(query) == listed(one_gone)


def test_wildcard_removes_everything_only_with_expires_zero_alone(site: Site) -> None:
    authed(site, contacts=("<sip:1001@192.0.2.10:5062>", "<sip:1001@192.0.2.11>"))
    bad = authed(site, call_id="w1", contacts=("*",), expires=60)
    assert bad.status == 400
    no_header = authed(site, call_id="w2", contacts=("*",))
    assert no_header.status == 400
    mixed = authed(site, call_id="w3", contacts=("*", "<sip:1001@192.0.2.11>"), expires=0)
    assert mixed.status == 400
    assert len(site.registrar.lookup("1001", 0.0)) == 2
    ok = authed(site, call_id="w4", contacts=("*",), expires=0)
    assert (ok.status, ok.contacts) == (200, [])
    assert site.registrar.lookup("1001", 0.0) == [] and site.rows() == []


def test_call_id_and_cseq_ordering(site: Site) -> None:
    """RFC 3261 §10.3 step 7."""
    assert authed(site, call_id="same", cseq=10, expires=600).status == 200  # stored cseq 11
    stale = authed(site, call_id="same", cseq=5, expires=900)  # cseq 6 <= 11
    assert stale.status == 500
    equal = site.registrar.handle_register(
        register(call_id="same", cseq=11, expires=900, authorization=_fresh_answer(site)),
        PHONE,
        0.0,
    )
    assert equal.status == 500
    assert site.registrar.lookup("1001", 0.0)[0].expires_at == 600
    newer = authed(site, call_id="same", cseq=20, expires=900)
    assert listed(newer) == {"sip:1001@192.0.2.10:5062": 900}
    # Another Call-ID (the phone rebooted) may carry any CSeq.
    reboot = authed(site, call_id="after-reboot", cseq=1, expires=300)
    assert listed(reboot) == {"sip:1001@192.0.2.10:5062": 300}
    # Wildcard removal obeys the same rule.
    assert authed(site, call_id="after-reboot", cseq=0, contacts=("*",), expires=0).status == 500
    assert authed(site, call_id="other", cseq=1, contacts=("*",), expires=0).status == 200


def _fresh_answer(site: Site, user: str = "1001") -> str:
    challenge = site.auth.challenge(None, site.clock.now)[0][1]
    return answer_challenge(
        challenge, method="REGISTER", uri=f"sip:{REALM}", username=user, password=PASSWORDS[user]
    )


def test_contacts_compare_by_uri_rules_not_text(site: Site) -> None:
    authed(site, contacts=("<sip:1001@PHONE.example:5062;Transport=udp>",), expires=600)
    again = authed(
        site, call_id="r2", contacts=("<sip:1001@phone.example:5062;transport=udp>",), expires=900
    )
    assert list(listed(again).values()) == [900]
    assert contact_key("sip:a@HOST;X=1;y") == contact_key("<sip:a@host;y;x=1>")
    assert contact_key("sip:A@host") != contact_key("sip:a@host")


def test_non_sip_to_is_refused_before_authentication(site: Site) -> None:
    """RFC 4475 §3.3.2 unksm2: a REGISTER whose To is an isbn: URI."""
    request = parse_message((VECTORS / "unksm2.dat").read_bytes())
    response = site.registrar.handle_register(request, PHONE, 0.0)
    assert response.status == 400
    assert site.rows() == []


def test_rfc4475_regaut01_unknown_scheme_is_challenged(site: Site) -> None:
    request = parse_message((VECTORS / "regaut01.dat").read_bytes())
    response = site.registrar.handle_register(request, Source("TCP", "192.0.2.253", 5060), 0.0)
    assert response.status == 401 and len(challenges(response)) == 2
    assert site.guard.admit(None, Source("TCP", "192.0.2.253", 5060), 0.0) is GuardVerdict.ALLOW


def test_user_may_only_register_its_own_address(site: Site) -> None:
    response = authed(site, user="1001", to=f"<sip:1002@{REALM}>")
    assert response.status == 403
    assert site.registrar.lookup("1002", 0.0) == []


def test_wrong_password_and_unknown_user_look_alike_and_feed_the_guard(site: Site) -> None:
    attacker = Source("UDP", "203.0.113.9", 5060)
    wrong = authed(site, password="guess", source=attacker)
    unknown = authed(site, user="7777", contacts=("<sip:7777@203.0.113.9>",), source=attacker)
    for response in (wrong, unknown):
        assert (response.status, response.reason) == (401, "Unauthorized")
        assert [n for n, _ in response.headers if n.endswith("Authenticate")] == [
            "WWW-Authenticate",
            "WWW-Authenticate",
        ]
        assert all("stale" not in c for c in challenges(response))
    assert [(n, len(v)) for n, v in wrong.headers if n == "WWW-Authenticate"] == [
        (n, len(v)) for n, v in unknown.headers if n == "WWW-Authenticate"
    ]
    assert site.guard.admit(None, attacker, 0.0) is GuardVerdict.ALLOW
    for _ in range(3):
        authed(site, password="guess", source=attacker)
    assert site.guard.admit(None, attacker, 0.0) is GuardVerdict.DROP
    assert site.guard.admit(None, PHONE, 0.0) is GuardVerdict.ALLOW
    assert site.registrar.stats["failed"] == 5


def test_stale_nonce_gets_stale_true_and_is_not_a_failure(site: Site) -> None:
    first = site.registrar.handle_register(register(), PHONE, 0.0)
    challenge = next(v for n, v in first.headers if n == "WWW-Authenticate")
    answer = answer_challenge(
        challenge,
        method="REGISTER",
        uri=f"sip:{REALM}",
        username="1001",
        password=PASSWORDS["1001"],
    )
    late = site.registrar.handle_register(register(cseq=2, authorization=answer), PHONE, 301.0)
    assert late.status == 401
    assert {c["stale"] for c in challenges(late)} == {"true"}
    assert site.guard._failures == {}
    assert site.registrar.lookup("1001", 301.0) == []


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"expires": "soon"}, 400),
        ({"contacts": ("<sip:1001@192.0.2.10>;expires=-5",)}, 400),
        ({"contacts": ("<sip:1001@192.0.2.10>;q=1.5",)}, 400),
        ({"contacts": ("<mailto:agent@example.com>",)}, 400),
    ],
)
def test_bad_register_gets_a_clear_error_and_loses_nothing(site: Site, kwargs, status) -> None:
    assert authed(site, expires=600).status == 200
    before = site.rows()
    response = authed(site, call_id="bad", **kwargs)
    assert response.status == status
    assert site.rows() == before


@pytest.mark.parametrize(
    "header",
    ["To: <sip:1001@edgecc.test", "Contact: <sip:1001@192.0.2.10"],
    ids=["to", "contact"],
)
def test_malformed_header_read_late_gets_400(site: Site, header: str) -> None:
    assert authed(site, expires=600).status == 200
    before = site.rows()
    name = header.split(":")[0]
    text = register(call_id="broken", authorization=_fresh_answer(site)).to_bytes().decode()
    lines = [ln for ln in text.split("\r\n") if not ln.startswith(name + ":")]
    lines.insert(1, header)
    response = site.registrar.handle_register(
        parse_message("\r\n".join(lines).encode()), PHONE, 0.0
    )
    assert response.status == 400
    assert site.rows() == before


def test_too_many_contacts_is_refused(site: Site) -> None:
    site.registrar.max_contacts = 3
    contacts = tuple(f"<sip:1001@192.0.2.{i}>" for i in range(3))
    assert authed(site, contacts=contacts).status == 200
    assert authed(site, call_id="more", contacts=("<sip:1001@192.0.2.99>",)).status == 403
    assert len(site.registrar.lookup("1001", 0.0)) == 3


def test_expired_bindings_disappear_and_are_pruned_from_the_database(site: Site) -> None:
    authed(site, contacts=("<sip:1001@192.0.2.10>",), expires=60)
    authed(site, user="1002", contacts=("<sip:1002@192.0.2.12>",), expires=600)
    site.clock.now = 61.0
    assert site.registrar.lookup("1001", 61.0) == []
    assert len(site.registrar.lookup("1002", 61.0)) == 1
    site.registrar.handle_timer(61.0)
    assert [r[0] for r in site.rows()] == [f"sip:1002@{REALM}"]
    assert site.registrar.next_timer() == 91.0


def test_bindings_survive_a_restart_and_expired_rows_are_dropped(tmp_path: Path) -> None:
    site = Site(tmp_path)
    try:
        authed(site, contacts=("<sip:1001@192.0.2.10>",), expires=3600)
        authed(site, user="1002", contacts=("<sip:1002@192.0.2.12>",), expires=60)
    finally:
        site.close()
    # Restart two minutes later (wall clock), on a new monotonic origin and a new secret.
    later = Site(tmp_path, wall0=WALL0 + 120, secret=b"t" * 32)
    try:
        [binding] = later.registrar.lookup("1001", 0.0)
        assert binding.expires_in(0.0) == 3600 - 120
        assert (binding.contact, binding.call_id, binding.cseq) == (
            "sip:1001@192.0.2.10",
            "reg-1@192.0.2.10",
            2,
        )
        assert later.registrar.lookup("1002", 0.0) == []
        assert [r[0] for r in later.rows()] == [f"sip:1001@{REALM}"]
        # A phone answering with a nonce from before the restart is asked again (stale).
        old_nonce = site.auth.challenge(None, 0.0)[0][1]
        answer = answer_challenge(
            old_nonce,
            method="REGISTER",
            uri=f"sip:{REALM}",
            username="1001",
            password=PASSWORDS["1001"],
        )
        stale = later.registrar.handle_register(
            register(call_id="after-restart", cseq=5, authorization=answer), PHONE, 1.0
        )
        assert {c["stale"] for c in challenges(stale)} == {"true"}
        assert authed(later, call_id="after-restart", cseq=6, expires=600).status == 200
    finally:
        later.close()


def test_store_refuses_in_memory_or_unmigrated_database(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="in-memory"):
        BindingStore(sqlite3.connect(":memory:"))
    bare = tmp_path / "bare.db"
    sqlite3.connect(bare).close()
    with pytest.raises(ValueError, match="open_site_db"):
        BindingStore(bare)


def test_binding_expires_in_rounds_and_floors_at_zero() -> None:
    b = Binding("sip:1@r", "sip:1@h", 100.0, "c", 1)
    assert (b.expires_in(0.4), b.expires_in(99.9), b.expires_in(150.0)) == (100, 0, 0)


def test_store_coalesces_a_burst_and_the_database_matches_memory(tmp_path: Path) -> None:
    db = open_site_db(tmp_path / "edgecc.db")
    store = BindingStore(db, clock=lambda: 0.0, wall_clock=lambda: WALL0, flush_interval=0.01)
    try:
        for round_ in range(10):
            for n in range(200):
                aor = f"sip:{n}@{REALM}"
                keep = Binding(
                    aor, f"sip:{n}@192.0.2.1:{5060 + round_}", 600.0 + round_, "c", round_
                )
                gone = store.bindings(aor)
                store.apply(aor, [keep], gone, 0.0)
        store.flush()
        assert len(store) == 200
        rows = db.execute("SELECT aor, contact, expires_at FROM sip_bindings").fetchall()
        assert sorted(rows) == sorted(
            (f"sip:{n}@{REALM}", f"sip:{n}@192.0.2.1:5069", WALL0 + 609.0) for n in range(200)
        )
    finally:
        store.close()
        db.close()


def test_write_behind_interval_is_cut_short_by_flush_and_close(tmp_path: Path) -> None:
    # A long write-behind interval must never hold back flush() or what close() writes: the
    # changes made just before a stop are on disk when close() returns.
    path = tmp_path / "edgecc.db"
    db = open_site_db(path)
    store = BindingStore(db, clock=lambda: 0.0, wall_clock=lambda: WALL0, flush_interval=3600.0)
    try:
        for step in range(3):
            aor = f"sip:{step}@{REALM}"
            store.apply(aor, [Binding(aor, f"sip:{step}@192.0.2.1", 600.0, "c", 1)], [], 0.0)
            if step < 2:
                store.flush(timeout=10.0)  # TimeoutError if it waited for the interval
                rows = db.execute("SELECT aor FROM sip_bindings").fetchall()
                assert sorted(r[0] for r in rows) == [f"sip:{n}@{REALM}" for n in range(step + 1)]
        store.close(timeout=10.0)
    finally:
        store.close()
        db.close()
    with sqlite3.connect(path) as check:
        rows = check.execute("SELECT aor FROM sip_bindings ORDER BY aor").fetchall()
    assert [r[0] for r in rows] == [f"sip:{n}@{REALM}" for n in range(3)]
