"""The bridge's ``.proto`` files and the code generated from them at build time.

The generated modules (``proto.bridge_pb2``, ``proto.bridge_pb2_grpc``) come from
``python -m proto.build``. What both ends must agree on beyond the messages lives here, free of
generated code: the bytes a pushed config's signature covers.
"""

from __future__ import annotations

import struct

CONFIG_SIGNATURE_DOMAIN = b"edgecc.bridge.v1.ConfigVersion\x00"
"""Prefix of every signed config payload, so the signature means nothing in another context."""


def config_signing_payload(site_id: str, version: int, yaml: bytes) -> bytes:
    """The bytes an ECDSA P-256/SHA-256 ``ConfigVersion.signature`` covers.

    Domain prefix, the site id (length-prefixed UTF-8), the version (8 bytes big-endian) and
    the YAML: a config signed for one site or version cannot be replayed as another.
    """
    site = site_id.encode("utf-8")
    if not 0 <= version < 2**64:
        raise ValueError(f"config version out of range: {version}")
    return CONFIG_SIGNATURE_DOMAIN + struct.pack(">H", len(site)) + site + struct.pack(
        ">Q", version
    ) + yaml


def verify_config_signature(
    ca_certificate_pem: bytes, site_id: str, version: int, yaml: bytes, signature: bytes
) -> bool:
    """True when ``signature`` is the cloud CA's signature of this config for this site/version.

    ``ca_certificate_pem`` is the CA certificate a site receives at enrolment
    (``EnrolResponse.ca_certificate_pem``).
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    public_key = x509.load_pem_x509_certificate(ca_certificate_pem).public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    try:
        public_key.verify(
            signature, config_signing_payload(site_id, version, yaml), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        return False
    return True
