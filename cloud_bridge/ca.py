"""The cloud's certificate authority: site certificates, the server certificate, signed configs.

One ECDSA P-256 CA per cloud, kept in ``DATA_DIR/ca/`` (key file mode 0600). It signs:

- the TLS server certificate of the gRPC server (names from ``server_names``);
- one client certificate per site at enrolment, common name = the site id, extended key usage
  clientAuth, valid ``site_cert_days``;
- pushed configs (ECDSA with SHA-256 over ``proto.config_signing_payload``), so a site that
  holds the CA certificate from enrolment can check a config came from its cloud.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proto import config_signing_payload, verify_config_signature

__all__ = [
    "CertificateAuthority",
    "CertificateError",
    "IssuedCertificate",
    "SiteCertificate",
    "check_site_id",
    "make_site_key_and_csr",
    "verify_config_signature",
]

SITE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
"""Site ids: lower case letters, digits, ``-`` and ``_``, 1 to 63 characters."""

_CLOCK_SKEW = dt.timedelta(minutes=5)


class CertificateError(Exception):
    """A certificate or request is malformed, not ours, expired or otherwise unacceptable."""


def check_site_id(site_id: str) -> str:
    """Return ``site_id`` when it is a valid site id, else raise ValueError saying why."""
    if not SITE_ID_RE.match(site_id):
        raise ValueError(
            f"invalid site id {site_id!r}: expected 1-63 of a-z, 0-9, - and _, "
            "starting with a letter or digit"
        )
    return site_id


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA signed for a site."""

    site_id: str
    """The site, also the certificate's common name."""
    serial: int
    """Serial number; revocation is by serial."""
    not_after: dt.datetime
    """End of validity (UTC)."""
    pem: bytes
    """The certificate, PEM."""


@dataclass(frozen=True)
class SiteCertificate:
    """What the server learns from a presented client certificate."""

    site_id: str
    """Common name of the subject."""
    serial: int
    """Serial number."""
    not_before: dt.datetime
    """Start of validity (UTC)."""
    not_after: dt.datetime
    """End of validity (UTC)."""


class CertificateAuthority:
    """The CA key and certificate, and everything signed with them."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self._key = key
        self.certificate = certificate

    @classmethod
    def create(cls, name: str = "edgecc cloud CA", *, days: int = 3650) -> CertificateAuthority:
        """A new self-signed CA (in memory)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=True,
                    crl_sign=True, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def load_or_create(cls, directory: Path | str) -> CertificateAuthority:
        """Load the CA from ``directory`` (``ca.key``, ``ca.crt``), creating it the first time."""
        directory = Path(directory)
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CertificateError(f"{key_path}: not an EC private key")
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()))
        if key_path.exists() or cert_path.exists():
            raise CertificateError(
                f"{directory}: one of ca.key and ca.crt is missing; restore both or remove both"
            )
        directory.mkdir(parents=True, exist_ok=True)
        ca = cls.create()
        _write_private(key_path, _key_pem(ca._key))
        cert_path.write_bytes(_pem(ca.certificate))
        return ca

    @property
    def certificate_pem(self) -> bytes:
        """The CA certificate, PEM."""
        return _pem(self.certificate)

    def open_escrow(self, escrow: bytes, site_id: str) -> bytes:
        """The site key a site sealed for this CA in its backup bundles (docs/backups.md).

        Raises ``edge_agent.bundle.TamperedBundle`` when the escrow is not for this CA and site.
        """
        from edge_agent.bundle import open_escrow  # the format lives with the bundle

        return open_escrow(self._key, escrow, site_id)

    # ------------------------------------------------------------ issuing

    def issue_server_certificate(
        self, names: list[str], *, days: int = 825
    ) -> tuple[bytes, bytes]:
        """A TLS server certificate for ``names`` (DNS names or IP addresses): (cert, key) PEM."""
        if not names:
            raise ValueError("a server certificate needs at least one name")
        key = ec.generate_private_key(ec.SECP256R1())
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        now = _now()
        cert = (
            self._builder(names[0], key.public_key(), now - _CLOCK_SKEW, now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alt), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return _pem(cert), _key_pem(key)

    def issue_site_certificate(
        self,
        csr_pem: bytes,
        site_id: str,
        *,
        days: int = 365,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """Sign the site's CSR. The subject is the site id whatever the CSR asked for.

        Raises CertificateError when the CSR does not parse, its signature is wrong or its key
        is not an acceptable type.
        """
        check_site_id(site_id)
        public_key = self.check_csr(csr_pem).public_key()
        now = _now()
        start = not_before or now - _CLOCK_SKEW
        end = not_after or now + dt.timedelta(days=days)
        cert = (
            self._builder(site_id, public_key, start, end)  # type: ignore[arg-type]
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        return IssuedCertificate(site_id, cert.serial_number, end, _pem(cert))

    @staticmethod
    def check_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
        """Parse a CSR and check its signature and key; raise CertificateError if unacceptable."""
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CertificateError(f"certificate signing request does not parse: {exc}") from None
        if not csr.is_signature_valid:
            raise CertificateError("certificate signing request has a bad signature")
        public_key = csr.public_key()
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            if public_key.curve.key_size < 256:
                raise CertificateError("EC key under 256 bits")
        elif isinstance(public_key, rsa.RSAPublicKey):
            if public_key.key_size < 2048:
                raise CertificateError("RSA key under 2048 bits")
        elif not isinstance(public_key, ed25519.Ed25519PublicKey):
            raise CertificateError("key type not accepted (use EC P-256, RSA or Ed25519)")
        return csr

    def _builder(
        self, common_name: str, public_key: object, start: dt.datetime, end: dt.datetime
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )

    # ------------------------------------------------------------ checking

    def check_site_certificate(
        self, pem: bytes, *, now: dt.datetime | None = None
    ) -> SiteCertificate:
        """Check a presented client certificate: ours, in its validity period, a site's name.

        TLS already verified the chain; this repeats the checks that matter to authorization so
        that a mistake in TLS configuration does not let a foreign certificate through.
        Revocation is the caller's business (the store holds the list).
        """
        try:
            cert = x509.load_pem_x509_certificate(pem)
        except ValueError as exc:
            raise CertificateError(f"client certificate does not parse: {exc}") from None
        if cert.issuer != self.certificate.subject:
            raise CertificateError("client certificate not issued by this cloud's CA")
        try:
            cert.verify_directly_issued_by(self.certificate)
        except (InvalidSignature, ValueError, TypeError):
            raise CertificateError("client certificate not signed by this cloud's CA") from None
        moment = now or _now()
        if moment < cert.not_valid_before_utc:
            raise CertificateError("client certificate not yet valid")
        if moment > cert.not_valid_after_utc:
            raise CertificateError("client certificate expired")
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1:
            raise CertificateError("client certificate must have exactly one common name")
        site_id = str(names[0].value)
        try:
            check_site_id(site_id)
        except ValueError as exc:
            raise CertificateError(str(exc)) from None
        return SiteCertificate(
            site_id, cert.serial_number, cert.not_valid_before_utc, cert.not_valid_after_utc
        )

    # ------------------------------------------------------------ configs

    def sign_config(self, site_id: str, version: int, yaml: bytes) -> bytes:
        """ECDSA P-256 / SHA-256 signature (DER) over ``config_signing_payload``."""
        payload = config_signing_payload(site_id, version, yaml)
        return self._key.sign(payload, ec.ECDSA(hashes.SHA256()))


def make_site_key_and_csr(site_id: str) -> tuple[bytes, bytes]:
    """A new EC P-256 key and a CSR naming ``site_id``: (key PEM, CSR PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, site_id)]))
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), csr.public_bytes(serialization.Encoding.PEM)
