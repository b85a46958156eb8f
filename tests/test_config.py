"""site.yaml validation: typed frozen objects, and errors naming file, key path, line, expectation."""

from __future__ import annotations

import hashlib
import textwrap
from pathlib import Path

import pydantic
import pytest

from appliance.config import ConfigError, SiteConfig, ha1, load_site, parse_site_yaml

MD5 = "0123456789abcdef0123456789abcdef"
SHA = "0123456789abcdef" * 4

VALID = f"""\
site: {{id: paris-1, name: "Paris", timezone: Europe/Paris}}
sip:
  bind: 127.0.0.1
  udp_port: 5070
  tcp_port: 5070
  tls_port: null
  realm: paris.example.com
  accounts:
    - {{user: "1001", display_name: "Agent 1001", ha1_md5: {MD5}, ha1_sha256: {SHA}}}
guard: {{exempt_sources: [192.0.2.0/24], rate_limit: 20}}
trunk: {{allowed_sources: ["198.51.100.7/32"]}}
http: {{port: 8081}}
media: {{rtp_ports: "30000-30999"}}
"""


def _write_site(tmp_path: Path, text: str) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    (site / "site.yaml").write_text(textwrap.dedent(text))
    return site


def _single_issue(site: Path) -> str:
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    message = str(caught.value)
    assert str(site / "site.yaml") in message
    assert len(caught.value.issues) == 1, message
    return message


def test_valid_file_loads_into_frozen_typed_objects(tmp_path: Path) -> None:
    site = _write_site(tmp_path, VALID)
    config = load_site(site)
    assert config.site.id == "paris-1"
    assert config.site_dir == site
    assert config.sip.udp_port == 5070 and config.sip.tls_port is None
    assert config.sip.accounts_by_user["1001"].ha1_sha256 == SHA
    assert config.media.rtp_ports == (30000, 30999)
    assert config.guard.exempt_sources == ("192.0.2.0/24",)
    assert config.guard.rate_limit == 20.0 and config.guard.ban_time == 900.0  # default kept
    assert config.sip.timers.t1 == 0.5
    # Relative paths resolve against the site directory.
    assert config.storage.database == site.resolve() / "edgecc.db"
    assert config.sip.tls.cert == site.resolve() / "tls/sip.crt"
    with pytest.raises(pydantic.ValidationError):
        config.sip.udp_port = 1  # type: ignore[misc]


def test_empty_file_is_all_defaults() -> None:
    config = parse_site_yaml("")
    assert config == SiteConfig()
    assert (config.sip.udp_port, config.sip.tls_port, config.http.port) == (5060, 5061, 8080)


@pytest.mark.parametrize(
    ("text", "key", "line", "expected"),
    [
        pytest.param(
            """\
            site: {id: demo}
            sip:
              realm: edgecc.local
              udp_port: five
            """,
            "sip.udp_port", 4, "expected a port number from 0 to 65535",
            id="wrong-type",
        ),
        pytest.param(
            """\
            sip:
              realm: edgecc.local
            http:
              port: 8080
              bnid: 127.0.0.1
            """,
            "http.bnid", 5, "unknown key (allowed here: bind, port)",
            id="unknown-key",
        ),
        pytest.param(
            """\
            sip:
              udp_port: 5060
            media:
              rtp_ports: "30000-20000"
            """,
            "media.rtp_ports", 4, "expected a port range 'LOW-HIGH'",
            id="bad-rtp-port-range",
        ),
        pytest.param(
            """\
            sip:
              tcp_port: 70000
            """,
            "sip.tcp_port", 2, "got 70000",
            id="port-out-of-range",
        ),
        pytest.param(
            f"""\
            sip:
              realm: edgecc.local
              accounts:
                - user: "1001"
                  ha1_md5: {MD5}
                  ha1_sha256: {SHA}
                - user: "1002"
                  ha1_md5: {MD5}
            """,
            "sip.accounts[1].ha1_sha256", 7, "required key is missing",
            id="missing-account-hash",
        ),
        pytest.param(
            f"""\
            sip:
              accounts:
                - {{user: 1001, ha1_md5: {MD5}, ha1_sha256: {SHA}}}
            """,
            "sip.accounts[0].user", 3, 'expected a string (quote it: "...")',
            id="unquoted-extension",
        ),
        pytest.param(
            """\
            site:
              id: demo
            sip:
              realm: "edgecc.local
              udp_port: 5060
            """,
            "(document)", 6, "malformed YAML: while scanning a quoted scalar (from line 4)",
            id="malformed-yaml",
        ),
        pytest.param(
            """\
            sip:
              udp_port: 5060
              bind: 127.0.0.1
              udp_port: 5062
            """,
            "sip.udp_port", 4, "duplicate key",
            id="duplicate-key",
        ),
        pytest.param(
            """\
            sip:
              registrar:
                min_expires: 600
                default_expires: 300
            """,
            "sip.registrar.default_expires", 4, "between min_expires (600)",
            id="cross-field",
        ),
        pytest.param(
            """\
            sip:
              udp_port: 20010
            """,
            "sip.udp_port", 2, "outside media.rtp_ports (20000-29999)",
            id="sip-port-inside-rtp-range",
        ),
    ],
)
def test_bad_file_names_key_line_and_expectation(
    tmp_path: Path, text: str, key: str, line: int, expected: str
) -> None:
    site = _write_site(tmp_path, text)
    message = _single_issue(site)
    assert f"site.yaml:{line}: {key}: " in message, message
    assert expected in message, message


def test_malformed_yaml_line_is_where_the_parser_stopped(tmp_path: Path) -> None:
    site = _write_site(tmp_path, "sip:\n  realm: x\n  udp_port: 5060: 1\n")
    message = _single_issue(site)
    assert "site.yaml:3: (document): malformed YAML" in message


def test_every_problem_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    site = _write_site(
        tmp_path,
        """\
        site: {id: "Not An Id"}
        guard:
          enabled: "sometimes"
          exempt_sources: [10.0.0.5/24]
        http: {bind: localhost}
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    keys = [(issue.line, issue.key) for issue in caught.value.issues]
    assert keys == [
        (1, "site.id"),
        (3, "guard.enabled"),
        (4, "guard.exempt_sources[0]"),
        (5, "http.bind"),
    ]
    assert "expected true or false" in str(caught.value)
    assert "host bits set" in str(caught.value)
    assert "expected an IP address" in str(caught.value)


def test_hash_values_are_not_echoed_in_errors(tmp_path: Path) -> None:
    secret_like = "Z" * 32
    site = _write_site(
        tmp_path,
        f"""\
        sip:
          accounts:
            - {{user: "1001", ha1_md5: {secret_like}, ha1_sha256: {SHA}}}
        """,
    )
    message = _single_issue(site)
    assert "sip.accounts[0].ha1_md5: expected 32 hexadecimal digits" in message
    assert secret_like not in message


def test_tls_enabled_needs_existing_files(tmp_path: Path) -> None:
    site = _write_site(tmp_path, "sip:\n  tls_port: 5061\n  tls:\n    cert: certs/a.pem\n")
    with pytest.raises(ConfigError) as caught:
        load_site(site)
    by_key = {issue.key: issue for issue in caught.value.issues}
    assert by_key["sip.tls.cert"].line == 4
    assert "does not exist" in by_key["sip.tls.cert"].expected
    assert by_key["sip.tls.key"].line == 3  # not written: the enclosing map's line
    (site / "certs").mkdir()
    (site / "certs/a.pem").write_text("x")
    (site / "tls").mkdir()
    (site / "tls/sip.key").write_text("x")
    assert load_site(site).sip.tls.cert == site.resolve() / "certs/a.pem"


def test_missing_site_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="edgecc init --site-dir"):
        load_site(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()


def test_ha1_is_md5_and_sha256_of_user_realm_password() -> None:
    md5, sha = ha1("1001", "edgecc.local", "secret")
    assert md5 == hashlib.md5(b"1001:edgecc.local:secret").hexdigest()
    assert sha == hashlib.sha256(b"1001:edgecc.local:secret").hexdigest()
    config = parse_site_yaml(
        f"sip:\n  accounts:\n    - {{user: '1001', ha1_md5: {md5.upper()}, ha1_sha256: {sha}}}\n"
    )
    assert config.sip.accounts[0].ha1_md5 == md5  # normalised to lower case
