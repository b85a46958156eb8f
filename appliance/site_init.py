"""Creating a site directory: ``site.yaml``, TLS certificate, site key and initial credentials.

The files are written so that a half-made site never looks like a site: every file goes to a
temporary name first and is renamed into place, secret files are created with mode 0600 from the
start (never widened and narrowed), and ``site.yaml`` is written last.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import json
import os
import secrets
import string
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.config import SITE_FILE, SiteConfig, ha1, parse_site_yaml

DEMO_CREDENTIALS = "demo-credentials.json"
INITIAL_CREDENTIALS = "initial-credentials.json"
SITE_KEY_BYTES = 32
CERT_DAYS = 365
_PASSWORD_ALPHABET = string.ascii_letters + string.digits


class SiteExistsError(Exception):
    """The directory already holds a site and ``force`` was not given."""


@dataclass(frozen=True)
class SiteSpec:
    """What a new site should look like (the answers to ``edgecc init``)."""

    site_id: str = "demo"
    site_name: str = "Demo site"
    timezone: str = "UTC"
    realm: str = "edgecc.local"
    bind: str = "127.0.0.1"
    sip_port: int = 5060
    """UDP and TCP."""
    tls_port: int | None = 5061
    """None: no TLS listener (and no certificate)."""
    http_bind: str = "127.0.0.1"
    http_port: int = 8080
    rtp_ports: tuple[int, int] = (20000, 29999)
    trunk_sources: tuple[str, ...] = ("127.0.0.1/32",)
    agents: int = 20
    first_extension: int = 1001
    credentials_file: str = DEMO_CREDENTIALS
    extra_hosts: tuple[str, ...] = field(default=())
    """More names for the certificate's subjectAltName."""


@dataclass(frozen=True)
class CreatedSite:
    """What ``create_site`` wrote."""

    site_dir: Path
    config: SiteConfig
    files: tuple[Path, ...]
    credentials: Path | None
    kept: tuple[Path, ...]
    """Existing files left untouched (the site key, so recordings stay readable)."""


def generate_password(length: int = 16) -> str:
    """A random password a person can type on a desk phone keypad's alphabet mode."""
    return "".join(secrets.choice(_PASSWORD_ALPHABET) for _ in range(length))


def render_site_yaml(spec: SiteSpec, passwords: dict[str, str]) -> str:
    """The text of site.yaml for ``spec``; accounts carry HA1 values only."""
    data: dict[str, Any] = SiteConfig().model_dump(mode="json")
    data["site"] = {"id": spec.site_id, "name": spec.site_name, "timezone": spec.timezone}
    sip = data["sip"]
    sip.update(
        bind=spec.bind, udp_port=spec.sip_port, tcp_port=spec.sip_port, tls_port=spec.tls_port,
        realm=spec.realm,
    )
    sip["accounts"] = []
    for user, password in passwords.items():
        md5, sha256 = ha1(user, spec.realm, password)
        sip["accounts"].append(
            {"user": user, "display_name": f"Agent {user}", "ha1_md5": md5, "ha1_sha256": sha256}
        )
    data["trunk"] = {"allowed_sources": list(spec.trunk_sources)}
    data["http"] = {"bind": spec.http_bind, "port": spec.http_port}
    data["media"] = {"rtp_ports": f"{spec.rtp_ports[0]}-{spec.rtp_ports[1]}"}
    if passwords:
        data["ivr"], data["queues"] = starter_call_path(list(passwords))
    header = (
        f"# edgecc site configuration for {spec.site_id!r}, made by `edgecc init`.\n"
        "# Every key is described in docs/config.md. Paths are relative to this directory.\n"
        "# Accounts hold digest HA1 values only; passwords are never stored here.\n"
    )
    body = yaml.dump(
        data, Dumper=_IndentedDumper, sort_keys=False, default_flow_style=False, width=100
    )
    return header + body


DEMO_DID = "+15550100"
"""The number the starter flow answers (the user part of the trunk's Request-URI)."""


def starter_call_path(agents: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ``ivr`` and ``queues`` sections of a new site: one DID, a flow that welcomes the
    caller and sends "1" to the queue ``support``, and that queue with every agent."""
    ivr = {
        "dids": {DEMO_DID: "main"},
        "flows": {
            "main": {
                "start": "welcome",
                "nodes": {
                    "welcome": {
                        "type": "menu", "prompt": "welcome", "options": {"1": "support"},
                        "timeout": 5, "retries": 3, "invalid_prompt": "invalid",
                        "timeout_prompt": "no_input", "on_failure": "goodbye",
                    },
                    "support": {"type": "queue", "queue": "support"},
                    "goodbye": {"type": "play", "prompt": "goodbye", "next": "bye"},
                    "bye": {"type": "hangup"},
                },
            },
        },
    }
    queues = [{"name": "support", "members": agents, "strategy": "longest-idle",
               "ring_timeout": 15.0, "wrap_up": 0.0, "record": True}]
    return ivr, queues


class _IndentedDumper(yaml.SafeDumper):
    """Indents list items under their key, as people write YAML by hand."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def make_certificate(
    realm: str, hosts: Iterable[str], *, days: int = CERT_DAYS
) -> tuple[bytes, bytes]:
    """A self-signed server certificate and its private key, both PEM."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in ("localhost", "127.0.0.1", "::1", realm, *hosts):
        if host in seen:
            continue
        seen.add(host)
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            names.append(x509.DNSName(host))
        else:
            if not address.is_unspecified:
                names.append(x509.IPAddress(address))
    subject = x509.Name([
        x509.NameAttribute(NameOID.COMMON_NAME, realm),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgecc appliance"),
    ])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_encipherment=True, content_commitment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def write_file_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file created with ``mode``, then rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)  # the umask may have narrowed it further than asked
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_site(site_dir: Path | str, spec: SiteSpec, *, force: bool = False) -> CreatedSite:
    """Write a complete, runnable site into ``site_dir``.

    Refuses (SiteExistsError) when ``site_dir/site.yaml`` exists unless ``force``; with
    ``force`` the configuration, certificate and credentials are replaced, while an existing
    site key and database are kept. Raises ConfigError, before writing anything, when the spec
    does not make a valid site.
    """
    directory = Path(site_dir)
    site_file = directory / SITE_FILE
    if site_file.exists() and not force:
        raise SiteExistsError(
            f"{directory} already holds a site ({SITE_FILE}); pass --force to replace its "
            "configuration, certificate and credentials (the site key and database are kept)"
        )
    users = [str(spec.first_extension + i) for i in range(spec.agents)]
    passwords = {user: generate_password() for user in users}
    text = render_site_yaml(spec, passwords)
    config = parse_site_yaml(text, file=str(site_file))  # the spec must make a valid file

    directory.mkdir(mode=0o750, parents=True, exist_ok=True)
    written: list[Path] = []
    kept: list[Path] = []
    if spec.tls_port is not None:
        cert_path = directory / config.sip.tls.cert
        key_path = directory / config.sip.tls.key
        cert_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        key_path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        cert_pem, key_pem = make_certificate(spec.realm, (spec.bind, *spec.extra_hosts))
        write_file_atomic(key_path, key_pem, 0o600)
        write_file_atomic(cert_path, cert_pem, 0o644)
        written += [cert_path, key_path]

    site_key = directory / config.storage.site_key
    if site_key.exists():
        kept.append(site_key)  # wraps recording keys: replacing it would orphan recordings
    else:
        site_key.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        write_file_atomic(site_key, secrets.token_bytes(SITE_KEY_BYTES), 0o600)
        written.append(site_key)

    credentials: Path | None = None
    if users:
        credentials = directory / spec.credentials_file
        write_file_atomic(credentials, _credentials_json(spec, passwords), 0o600)
        written.append(credentials)

    # HA1 values let anyone answer digest challenges for the realm: keep site.yaml private too.
    write_file_atomic(site_file, text.encode(), 0o600)
    written.append(site_file)
    _fsync_dir(directory)
    database = directory / config.storage.database
    if database.exists():
        kept.append(database)
    return CreatedSite(
        site_dir=directory,
        config=parse_site_yaml(text, file=str(site_file), site_dir=directory),
        files=tuple(written),
        credentials=credentials,
        kept=tuple(kept),
    )


def _credentials_json(spec: SiteSpec, passwords: dict[str, str]) -> bytes:
    address = spec.bind
    if ipaddress.ip_address(address).is_unspecified:
        address = "127.0.0.1" if ipaddress.ip_address(address).version == 4 else "::1"
    host = f"[{address}]" if ":" in address else address
    transports = {"udp": spec.sip_port, "tcp": spec.sip_port}
    if spec.tls_port is not None:
        transports["tls"] = spec.tls_port
    http_host = spec.http_bind if spec.http_bind not in ("0.0.0.0", "::") else address
    http_host = f"[{http_host}]" if ":" in http_host else http_host
    document = {
        "site": spec.site_id,
        "realm": spec.realm,
        "sip": {
            "address": address,
            "ports": transports,
            "registrar": f"sip:{host}:{spec.sip_port}",
            "note": "port 0 means any free port: read the real ones from the appliance's "
            "start-up line",
        },
        "http": f"http://{http_host}:{spec.http_port}",
        "trunk": {"allowed_sources": list(spec.trunk_sources)},
        "accounts": [
            {
                "user": user,
                "auth_user": user,
                "password": password,
                "display_name": f"Agent {user}",
                "aor": f"sip:{user}@{host}",
            }
            for user, password in passwords.items()
        ],
    }
    return (json.dumps(document, indent=2) + "\n").encode()
