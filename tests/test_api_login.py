"""Logins: passwords (scrypt), TOTP for admins and supervisors, lockout, expiry, logout."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_api_server import PASSWORD, ApiServer

from appliance.api import LoginPolicy, Role, UserStore, totp
from appliance.api.passwords import verify_password
from appliance.api.users import LoginOutcome, UserError
from appliance.recording.crypto import SiteKeyError

POLICY = LoginPolicy(token_ttl=600, max_failures=3, failure_window=60, lockout=120,
                     max_tokens_per_user=3)
INVALID = "wrong name, password or code"


def write_site_key(directory: Path, key: bytes | None = None) -> bytes:
    key = key if key is not None else os.urandom(32)
    path = directory / "site.key"
    path.write_bytes(key)
    path.chmod(0o600)
    return key


def database_bytes(path: Path) -> bytes:
    """The database file and its WAL, as a copy of the site would hold them."""
    return b"".join(p.read_bytes() for p in (path, Path(f"{path}-wal")) if p.exists())


@pytest.fixture
def api(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ApiServer]:
    policy = getattr(request, "param", POLICY)
    write_site_key(tmp_path)  # as in a site made by edgecc init: TOTP secrets are sealed
    server = ApiServer(tmp_path, policy=policy)
    try:
        server.add("ada", Role.ADMIN)
        server.add("sam", Role.SUPERVISOR)
        server.add("alex", Role.AGENT)
        yield server
    finally:
        server.close()


def login(api: ApiServer, name: str, password: str = PASSWORD, code: str | None = None):
    body = {"name": name, "password": password}
    if code is not None:
        body["totp"] = code
    return api.request("POST", "/api/login", body)


def test_secrets_are_stored_hashed(api: ApiServer) -> None:
    token = api.token("alex")
    with sqlite3.connect(api.db_path) as conn:
        stored = dict(conn.execute("SELECT name, password_hash FROM api_users"))
        tokens = [t for (t,) in conn.execute("SELECT token_hash FROM api_tokens")]
    assert all(h.startswith("scrypt$32768$8$1$") for h in stored.values())
    assert PASSWORD not in "".join(stored.values())
    assert verify_password(PASSWORD, stored["alex"])
    assert not verify_password(PASSWORD + "x", stored["alex"])
    assert token not in tokens and len(tokens) == 1 and len(tokens[0]) == 64


@pytest.mark.parametrize("api", [LoginPolicy(max_failures=20)], indirect=True)
@pytest.mark.parametrize("name", ["ada", "sam"])
def test_admins_and_supervisors_need_a_valid_fresh_code(api: ApiServer, name: str) -> None:
    assert login(api, name).status == 401  # password alone
    assert login(api, name, code=api.code(name, offset_steps=2)).status == 401  # too far off
    wrong = f"{(int(api.code(name)) + 1) % 10**6:06d}"
    assert login(api, name, code=wrong).body == {"error": INVALID, "field": None}
    ok = login(api, name, code=api.code(name))
    assert ok.status == 200 and ok.body["role"] == Role(ok.body["role"]).value
    # RFC 6238 §5.2: a code is accepted once only, even within its step...
    assert login(api, name, code=api.code(name)).status == 401
    # ...and so is an older one; the next step's code works.
    api.clock.advance(totp.STEP_S)
    assert login(api, name, code=api.code(name, offset_steps=-1)).status == 401
    assert login(api, name, code=api.code(name)).status == 200


def test_one_step_of_clock_drift_is_accepted(api: ApiServer) -> None:
    assert login(api, "ada", code=api.code("ada", offset_steps=-1)).status == 200
    api.clock.advance(3 * totp.STEP_S)
    assert login(api, "sam", code=api.code("sam", offset_steps=1)).status == 200


def test_agents_log_in_with_a_password(api: ApiServer) -> None:
    reply = login(api, "alex")
    assert reply.status == 200
    assert reply.body["role"] == "agent" and reply.body["token_type"] == "bearer"
    assert reply.body["expires_at"] == pytest.approx(api.clock() + POLICY.token_ttl)
    assert len(reply.body["token"]) >= 43  # 256 bits in base64url


def test_unknown_user_and_wrong_password_look_the_same(api: ApiServer) -> None:
    unknown = login(api, "nobody")
    wrong = login(api, "alex", "not the password")
    assert unknown.status == wrong.status == 401
    assert unknown.body == wrong.body == {"error": INVALID, "field": None}


def test_lockout_after_failures_within_the_window(api: ApiServer) -> None:
    token = api.token("alex")
    for _ in range(POLICY.max_failures):
        assert login(api, "alex", "not the password").status == 401
    locked = login(api, "alex")  # even the right password is refused now
    assert locked.status == 429
    assert locked.headers["retry-after"] == str(int(POLICY.lockout))
    assert "try again" in locked.body["error"]
    # Locking ends the user's sessions; other users are not affected.
    assert api.request("GET", "/api/me", token=token).status == 401
    assert login(api, "ada", code=api.code("ada")).status == 200
    admin_token = api.users.issue_token(api.accounts["ada"].user_id)[0]
    listed = api.request("GET", "/api/config/accounts", token=admin_token).body["api_users"]
    assert next(u for u in listed if u["name"] == "alex")["locked_until"] is not None
    api.clock.advance(POLICY.lockout - 1)
    assert login(api, "alex").status == 429
    api.clock.advance(2)
    assert login(api, "alex").status == 200
    rows = [r["action"] for r in api.audit_rows() if "alex" in r["actor"]]
    assert rows.count("login_locked") == 2


def test_failures_outside_the_window_do_not_add_up(api: ApiServer) -> None:
    for _ in range(POLICY.max_failures - 1):
        assert login(api, "alex", "not the password").status == 401
    api.clock.advance(POLICY.failure_window + 1)
    assert login(api, "alex", "not the password").status == 401
    assert login(api, "alex").status == 200
    # A success clears the count.
    for _ in range(POLICY.max_failures - 1):
        assert login(api, "alex", "not the password").status == 401
    assert login(api, "alex").status == 200


def test_bad_codes_count_towards_the_lockout(api: ApiServer) -> None:
    for _ in range(POLICY.max_failures):
        assert login(api, "ada", code="000000" if api.code("ada") != "000000"
                     else "111111").status == 401
    assert login(api, "ada", code=api.code("ada")).status == 429


def test_logout_revokes_the_token_only(api: ApiServer) -> None:
    first, second = api.token("alex"), api.token("alex")
    assert api.request("POST", "/api/logout", token=first).status == 204
    assert api.request("GET", "/api/me", token=first).status == 401
    assert api.request("POST", "/api/logout", token=first).status == 401
    assert api.request("GET", "/api/me", token=second).status == 200


def test_tokens_expire(api: ApiServer) -> None:
    token = api.token("alex")
    api.clock.advance(POLICY.token_ttl - 1)
    assert api.request("GET", "/api/me", token=token).status == 200
    api.clock.advance(1)
    reply = api.request("GET", "/api/me", token=token)
    assert reply.status == 401 and "expired" in reply.body["error"]


def test_live_tokens_per_user_are_bounded(api: ApiServer) -> None:
    tokens = [api.token("alex") for _ in range(POLICY.max_tokens_per_user + 1)]
    assert api.request("GET", "/api/me", token=tokens[0]).status == 401  # the oldest went
    for token in tokens[1:]:
        assert api.request("GET", "/api/me", token=token).status == 200


def test_bad_users_are_refused_naming_the_field(api: ApiServer) -> None:
    with pytest.raises(UserError) as taken:
        api.users.add_user("ada", Role.AGENT, PASSWORD)
    assert taken.value.field == "name"
    with pytest.raises(UserError) as short:
        api.users.add_user("newbie", Role.AGENT, "short")
    assert short.value.field == "password"
    with pytest.raises(UserError) as role:
        api.users.add_user("newbie", "root", PASSWORD)
    assert role.value.field == "role"
    with pytest.raises(UserError) as name:
        api.users.add_user("new bie", Role.AGENT, PASSWORD)
    assert name.value.field == "name"
    assert [u.name for u in api.users.users()] == ["ada", "alex", "sam"]  # nothing added


# --------------------------------------------------------------------------- TOTP secrets at rest


def test_totp_secrets_are_sealed_with_the_site_key(api: ApiServer) -> None:
    assert api.users.seals_secrets
    with sqlite3.connect(api.db_path) as conn:
        stored = dict(conn.execute("SELECT name, totp_secret FROM api_users"))
    assert stored["alex"] is None
    for name in ("ada", "sam"):
        secret = api.accounts[name].secret
        assert stored[name].startswith(totp.SEALED_PREFIX)
        assert totp.secret_to_base32(secret) not in stored[name]
    raw = database_bytes(api.db_path)
    for name in ("ada", "sam"):
        secret = api.accounts[name].secret
        assert secret not in raw and totp.secret_to_base32(secret).encode() not in raw
    assert login(api, "ada", code=api.code("ada")).status == 200


def test_a_database_copied_without_the_site_key_yields_no_secret(api: ApiServer,
                                                                 tmp_path: Path) -> None:
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    with sqlite3.connect(api.db_path) as source, sqlite3.connect(elsewhere / "edgecc.db") as dest:
        source.backup(dest)
    raw = database_bytes(elsewhere / "edgecc.db")
    assert totp.secret_to_base32(api.accounts["ada"].secret).encode() not in raw
    now = api.clock()
    for key in (None, os.urandom(32)):  # no key at all, or another site's key
        store = UserStore.open(elsewhere / "edgecc.db", site_key=key, clock=lambda: now)
        try:
            result = store.login("ada", PASSWORD, api.code("ada"), "test")
            assert (result.outcome, result.reason) == (LoginOutcome.INVALID,
                                                       "totp secret unreadable here")
            # Not a guess: nothing counted against the user.
            assert store._conn.execute("SELECT failures FROM api_users WHERE name = 'ada'"
                                       ).fetchone()[0] == 0
        finally:
            store.close()


def test_plain_secrets_from_before_are_sealed_when_a_store_with_the_key_opens(
        tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    now = 1_700_000_000.0
    plain = UserStore.open(path, site_key=None, clock=lambda: now)
    try:
        _user, secret = plain.add_user("ada", Role.ADMIN, PASSWORD)
    finally:
        plain.close()
    base32 = totp.secret_to_base32(secret)
    assert base32.encode() in database_bytes(path)  # what older versions left behind
    key = write_site_key(tmp_path)
    store = UserStore.open(path, clock=lambda: now)  # finds site.key beside the database
    try:
        assert store.seals_secrets and store.seal_plain_secrets() == 0  # done at open
        stored = store._conn.execute("SELECT totp_secret FROM api_users").fetchone()[0]
        assert totp.is_sealed(stored)
        assert totp.open_secret(totp.secret_key(key), 1, stored) == secret
        assert base32.encode() not in database_bytes(path)
        result = store.login("ada", PASSWORD, totp.totp(secret, now), "test")
        assert result.outcome is LoginOutcome.OK
    finally:
        store.close()


def test_a_damaged_plain_secret_does_not_stop_the_others_being_sealed(tmp_path: Path) -> None:
    path = tmp_path / "edgecc.db"
    now = 1_700_000_000.0
    plain = UserStore.open(path, site_key=None, clock=lambda: now)
    try:
        _user, secret = plain.add_user("ada", Role.ADMIN, PASSWORD)
        plain.add_user("sam", Role.SUPERVISOR, PASSWORD)
        with plain._conn:
            plain._conn.execute("UPDATE api_users SET totp_secret = 'not base32!' "
                                "WHERE name = 'sam'")
    finally:
        plain.close()
    write_site_key(tmp_path)
    store = UserStore.open(path, clock=lambda: now)
    try:
        stored = dict(store._conn.execute("SELECT name, totp_secret FROM api_users"))
        assert totp.is_sealed(stored["ada"]) and stored["sam"] == "not base32!"
        assert store.login("ada", PASSWORD, totp.totp(secret, now), "t").outcome is \
            LoginOutcome.OK
        assert store.login("sam", PASSWORD, "123456", "t").outcome is LoginOutcome.INVALID
    finally:
        store.close()


def test_a_site_key_others_can_read_is_refused(tmp_path: Path) -> None:
    write_site_key(tmp_path)
    (tmp_path / "site.key").chmod(0o644)
    with pytest.raises(SiteKeyError, match="chmod 600"):
        UserStore.open(tmp_path / "edgecc.db")


def test_a_sealed_secret_moved_to_another_user_does_not_open(api: ApiServer) -> None:
    with sqlite3.connect(api.db_path) as conn:
        conn.execute("UPDATE api_users SET totp_secret = (SELECT totp_secret FROM api_users "
                     "WHERE name = 'ada') WHERE name = 'sam'")
    assert login(api, "sam", code=api.code("ada")).status == 401
    assert login(api, "sam", code=api.code("sam")).status == 401
    assert login(api, "ada", code=api.code("ada")).status == 200
