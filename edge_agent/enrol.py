"""Enrolment: a one-time token and a CSR buy the site its certificate (docs/cloud.md, Enrol).

The private key never leaves the site. Key, certificate and the cloud's CA are written into the
site directory only after the cloud answered and the answer checked out, each file atomically
(temporary file, fsync, rename), the key and certificate with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.log import kv
from edge_agent.channel import pb, pb_grpc, secure_channel
from edge_agent.config import CLOUD_FILE, CloudSection, EdgeConfigError, read_site

log = logging.getLogger("edgecc.edge_agent")

CLOUD_DIR = "cloud"
KEY_FILE, CERT_FILE, CA_FILE = "cloud/site.key", "cloud/site.crt", "cloud/ca.crt"


class EnrolmentError(Exception):
    """Enrolment failed; the site directory is unchanged."""


@dataclass(frozen=True)
class Enrolled:
    """What enrolment wrote."""

    site_id: str
    """The site the certificate names."""
    certificate: Path
    key: Path
    ca_cert: Path
    not_after: dt.datetime
    """End of the certificate's validity."""
    serial: int


def enrol(
    site_dir: Path | str, *, cloud: str, token: str, ca_cert: Path | str,
    enrol_port: int | None = None, force: bool = False, timeout: float = 20.0,
) -> Enrolled:
    """Enrol the site at ``site_dir`` with the cloud at ``cloud`` (HOST:PORT of its link port).

    ``enrol_port`` defaults to the link port + 1. Raises EnrolmentError (nothing written) when
    the site is already enrolled (unless ``force``), the CA file is unreadable, the cloud
    refuses, or it names another site than ``site.yaml``.
    """
    directory = Path(site_dir)
    try:
        site_id, _ = read_site(directory)
    except EdgeConfigError as exc:
        raise EnrolmentError(str(exc)) from None
    host, _, port_text = cloud.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise EnrolmentError(f"--cloud must be HOST:PORT of the cloud's link port, got {cloud!r}")
    link_port = int(port_text)
    port = enrol_port if enrol_port is not None else link_port + 1
    cert_path, key_path, ca_path = (directory / p for p in (CERT_FILE, KEY_FILE, CA_FILE))
    if cert_path.exists() and not force:
        raise EnrolmentError(
            f"the site is already enrolled ({cert_path}); enrol again with --force and a new "
            "token to replace its certificate"
        )
    try:
        anchor = Path(ca_cert).read_bytes()
        x509.load_pem_x509_certificate(anchor)
    except (OSError, ValueError) as exc:
        raise EnrolmentError(f"--ca-cert {ca_cert}: not a readable PEM certificate: {exc}") from None

    key_pem, reply, certificate = request_certificate(
        host, port, anchor, site_id=site_id, token=token, address=cloud, timeout=timeout
    )
    write_credentials(directory, key_pem, reply.certificate_pem, reply.ca_certificate_pem, cloud)
    log.info(kv(event="enrolled", site=site_id, serial=f"{certificate.serial_number:x}",
                not_after=certificate.not_valid_after_utc.isoformat()))
    return Enrolled(site_id, cert_path, key_path, ca_path, certificate.not_valid_after_utc,
                    certificate.serial_number)


def request_certificate(
    host: str, port: int, anchor: bytes, *, site_id: str, token: str, address: str,
    timeout: float = 20.0,
) -> tuple[bytes, Any, x509.Certificate]:
    """Make a key, send its CSR and ``token`` to the enrol port; (key PEM, reply, certificate).

    Raises EnrolmentError when the cloud refuses, names another site, or certifies another key.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_id)]))
        .sign(key, hashes.SHA256())
    )
    section = CloudSection(address=address)
    with secure_channel(f"{host}:{port}", section, anchor) as channel:
        try:
            reply: Any = pb_grpc.EnrolmentStub(channel).Enrol(
                pb.EnrolRequest(token=token, csr_pem=csr.public_bytes(serialization.Encoding.PEM)),
                timeout=timeout,
            )
        except grpc.RpcError as exc:
            raise EnrolmentError(
                f"the cloud at {host}:{port} refused enrolment: {exc.code().name} {exc.details()}"
            ) from None
    if reply.site_id != site_id:
        raise EnrolmentError(
            f"the token was issued for site {reply.site_id!r} but this site is {site_id!r} "
            f"(site.yaml); the token is spent: ask for a token for {site_id!r}"
        )
    certificate = x509.load_pem_x509_certificate(reply.certificate_pem)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if certificate.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise EnrolmentError("the cloud returned a certificate for another key")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, reply, certificate


def write_credentials(
    directory: Path, key_pem: bytes, cert_pem: bytes, ca_pem: bytes, address: str
) -> None:
    """Write the site's key, certificate, the cloud CA and cloud.yaml, each atomically."""
    (directory / CLOUD_DIR).mkdir(mode=0o700, exist_ok=True)
    write_atomic(directory / KEY_FILE, key_pem, 0o600)
    write_atomic(directory / CERT_FILE, cert_pem, 0o600)
    write_atomic(directory / CA_FILE, ca_pem, 0o644)
    _write_cloud_yaml(directory, address)


def _write_cloud_yaml(directory: Path, address: str) -> None:
    """Set ``cloud.address`` in cloud.yaml, keeping any other settings already there."""
    file = directory / CLOUD_FILE
    data: dict[str, Any] = {}
    if file.exists():
        loaded = yaml.safe_load(file.read_text(encoding="utf-8"))
        if isinstance(loaded, dict):
            data = loaded
    section = data.get("cloud")
    if not isinstance(section, dict):
        section = {}
    section["address"] = address
    data["cloud"] = section
    write_atomic(file, yaml.safe_dump(data, sort_keys=False).encode(), 0o644)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (mode ``mode``) whole or not at all: a temporary file,
    fsync, rename, fsync of the directory."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
