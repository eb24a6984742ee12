"""Certificates for a deployment: a CA and a certificate per party (``permllm keys``).

Layer: runtime (above :mod:`permllm.net`, whose :mod:`~permllm.net.tls` builds the
mutual-TLS contexts that use these files). Each certificate names its party's
role in a URI subject alternative name ``urn:permllm:role:<role>``; the handshake
checks that the role a peer claims is the one its certificate names. Keys are
ECDSA P-256; private keys are written unencrypted with mode 0600.

Layout of a keys directory: ``ca.pem`` and ``ca.key`` (the CA; keep ``ca.key``
offline once the certificates are issued), ``<name>.pem`` and ``<name>.key`` per
party (``name`` defaults to the role).
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..net.tls import ROLE_URI, fingerprint

__all__ = ["ROLES", "Issued", "make_ca", "load_ca", "issue", "make_keys"]

ROLES = ("model", "helper", "user")


@dataclass(frozen=True)
class Issued:
    """Paths of one issued certificate and its key, and the certificate's fingerprint."""

    name: str
    role: str
    cert: Path
    key: Path
    fingerprint: str


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def make_ca(out: Path, *, name: str = "permllm deployment CA", days: int = 3650) -> tuple[Path, Path]:
    """Create ``ca.pem`` and ``ca.key`` in ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    (out / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "ca.key", key)
    return out / "ca.pem", out / "ca.key"


def load_ca(ca_cert: Path, ca_key: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read a CA made by :func:`make_ca`."""
    cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key} is not an EC private key")
    return cert, key


def issue(out: Path, ca_cert: Path, ca_key: Path, role: str, *, name: str | None = None, days: int = 365,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None) -> Issued:
    """Issue ``<name>.pem``/``<name>.key`` in ``out`` for a party playing ``role``, signed by the CA.

    Valid from ``not_before`` (default: now) to ``not_after`` (default: ``days`` later).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    name = name or role
    ca, signer = load_ca(ca_cert, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or _now() - dt.timedelta(minutes=5)
    end = not_after or start + dt.timedelta(days=days)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ROLE_URI + role)]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
            .sign(signer, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    der = cert.public_bytes(serialization.Encoding.DER)
    (out / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(out / f"{name}.key", key)
    return Issued(name, role, out / f"{name}.pem", out / f"{name}.key", fingerprint(der))


def make_keys(out: Path, roles: tuple[str, ...] = ROLES, *, names: tuple[str, ...] | None = None,
              days: int = 365) -> list[Issued]:
    """``permllm keys``: the CA in ``out`` (made if ``ca.key`` is not there yet) and a certificate per role.

    ``names`` name the files (default: the roles); with one role and several names, each
    name gets a certificate for that role (e.g. several users).
    """
    if not (out / "ca.key").exists():
        make_ca(out)
    names = names or roles
    if len(roles) == 1:
        roles = roles * len(names)
    if len(names) != len(roles):
        raise ValueError("give one name per role, or one role for all the names")
    return [issue(out, out / "ca.pem", out / "ca.key", r, name=n, days=days) for r, n in zip(roles, names)]
