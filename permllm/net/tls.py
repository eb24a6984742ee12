"""Mutual TLS for the links between parties: contexts and the identity in a peer's certificate.

Part of ``permllm.net``, the bottom layer of permllm; it knows nothing of
protocols or models. Every party of a deployment holds a certificate issued by
the deployment's CA (``permllm keys`` makes them) that names its role in a URI
subject alternative name ``urn:permllm:role:<role>``. Both ends of a link
present a certificate and verify the other's against the CA
(:func:`server_context`, :func:`client_context`); the channel handshake then
checks that the role a peer claims is one its certificate names (see
``channel._check_hello``). Certificates name roles, not host names: hostnames
are not checked, the role is (a party's address may change, its role may not).
A deployment may also pin a peer's certificate by its SHA-256 fingerprint
(:func:`check_pin`), so that not even the CA's holder can stand in for it.
"""

from __future__ import annotations

import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import TlsError

__all__ = ["ROLE_URI", "PeerCert", "server_context", "client_context", "peer_cert", "check_pin", "fingerprint",
           "tls_reason"]

ROLE_URI = "urn:permllm:role:"


@dataclass(frozen=True, slots=True)
class PeerCert:
    """What a verified peer certificate says: the roles it names, its subject, fingerprint and expiry."""

    roles: tuple[str, ...]
    subject: str          # the subject's common name
    fingerprint: str      # "sha256:<hex>" of the DER certificate
    not_after: str

    def __str__(self) -> str:
        return f"certificate {self.subject!r} ({self.fingerprint[:19]}...)"


def fingerprint(der: bytes) -> str:
    """``sha256:<hex>`` of a DER certificate (what ``permllm keys`` prints and ``tls.pins`` holds)."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _context(purpose: int, ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # identities are roles (checked after the handshake), not host names
    for what, path in (("CA certificate", ca), ("certificate", cert), ("private key", key)):
        if not Path(path).is_file():
            raise TlsError(f"TLS {what} file {str(path)!r} does not exist")
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"cannot load the TLS CA certificate {str(ca)!r}: {e}") from e
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as e:
        raise TlsError(f"cannot load the TLS certificate {str(cert)!r} with key {str(key)!r}: {e}") from e
    return ctx


def server_context(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A TLS 1.3 server context that presents ``cert`` and requires a client certificate issued by ``ca``."""
    return _context(ssl.PROTOCOL_TLS_SERVER, ca, cert, key)


def client_context(ca: str | Path, cert: str | Path, key: str | Path) -> ssl.SSLContext:
    """A TLS 1.3 client context that presents ``cert`` and requires a server certificate issued by ``ca``."""
    return _context(ssl.PROTOCOL_TLS_CLIENT, ca, cert, key)


def peer_cert(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> PeerCert | None:
    """The verified peer certificate of a TLS connection (None for plain TCP)."""
    if ssl_object is None:
        return None
    info = ssl_object.getpeercert()
    der = ssl_object.getpeercert(binary_form=True)
    if not info or der is None:
        return None
    roles = tuple(v[len(ROLE_URI):] for k, v in info.get("subjectAltName", ()) if k == "URI" and v.startswith(ROLE_URI))
    cn = next((v for rdn in info.get("subject", ()) for k, v in rdn if k == "commonName"), "")
    return PeerCert(roles, cn, fingerprint(der), str(info.get("notAfter", "")))


def tls_reason(e: BaseException) -> str:
    """The useful part of an ssl error: OpenSSL's verify message or reason (e.g. "tlsv1 alert unknown ca")."""
    if isinstance(e, ssl.SSLCertVerificationError) and e.verify_message:
        return f"certificate verify failed: {e.verify_message}"
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason.lower().replace("_", " ")
    if isinstance(e, (ConnectionResetError, BrokenPipeError)):
        return "the peer closed the connection (it may not trust this party's certificate)"
    return str(e) or type(e).__name__


def check_pin(cert: PeerCert | None, role: str, pins: Mapping[str, str], peer: str) -> None:
    """Raise TlsError unless the certificate of ``peer`` (playing ``role``) matches ``pins[role]``, if pinned."""
    want = pins.get(role)
    if want is None:
        return
    if cert is None:
        raise TlsError(f"peer {peer!r} ({role}) has a pinned certificate but the link is not TLS")
    if cert.fingerprint.lower() != want.lower():
        raise TlsError(f"peer {peer!r} ({role}) presented {cert.fingerprint}, "
                       f"but this party pins {want} for the {role} role")
