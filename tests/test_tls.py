"""Certificates (permllm.runtime.keys) and mutual TLS links (permllm.net.tls) in one process.

The process-level checks (a real daemon refusing an unknown CA, an expired certificate,
another role's certificate) are in test_daemon.py.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import stat

import pytest
from cryptography import x509

from permllm.net import HandshakeError, Meter, TlsError, accept_channel, open_channel, tcp_connect, tcp_serve
from permllm.net.tls import ROLE_URI, check_pin, client_context, server_context
from permllm.runtime.keys import issue, make_keys

SID = "0123456789abcdef" * 2


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    mine = {i.role: i for i in make_keys(root / "a")}
    other = {i.role: i for i in make_keys(root / "b")}
    return root, mine, other


def test_keys_layout_and_contents(pki):
    root, mine, _ = pki
    for i in mine.values():
        assert stat.S_IMODE(os.stat(i.key).st_mode) == 0o600
        cert = x509.load_pem_x509_certificate(i.cert.read_bytes())
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
        assert uris == [ROLE_URI + i.role]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        assert i.fingerprint.startswith("sha256:") and len(i.fingerprint) == 71
    ca = x509.load_pem_x509_certificate((root / "a" / "ca.pem").read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert stat.S_IMODE(os.stat(root / "a" / "ca.key").st_mode) == 0o600
    # A second run reuses the CA: a new user certificate is trusted by the same ca.pem.
    before = (root / "a" / "ca.pem").read_bytes()
    again = make_keys(root / "a", ("user",), names=("alice",))
    assert again[0].cert.name == "alice.pem" and (root / "a" / "ca.pem").read_bytes() == before


def test_context_files_are_checked(pki, tmp_path):
    root, mine, _ = pki
    with pytest.raises(TlsError, match="does not exist"):
        server_context(tmp_path / "nope.pem", mine["model"].cert, mine["model"].key)
    with pytest.raises(TlsError, match="cannot load the TLS certificate"):
        client_context(root / "a" / "ca.pem", mine["model"].cert, mine["user"].key)  # key of another cert


async def _link(server_files, client_files, *, server_role="model", client_role="user", claim=None):
    """One mutual-TLS link on loopback; returns (client channel or error, server channel or error)."""
    ca, cert, key = server_files
    accepted: asyncio.Queue = asyncio.Queue()

    async def on(t):
        try:
            await accepted.put((await accept_channel(t, Meter(), role=server_role, peer_roles={client_role},
                                                     timeout=5))[0])
        except Exception as e:  # noqa: BLE001 (handed to the test)
            await accepted.put(e)

    server = await tcp_serve("127.0.0.1", 0, on, ssl=server_context(ca, cert, key), handshake_timeout=5)
    port = server.sockets[0].getsockname()[1]
    try:
        try:
            t = await tcp_connect("127.0.0.1", port, ssl=client_context(*client_files), peer=server_role)
            client = await open_channel(t, Meter(), role=claim or client_role, peer_role=server_role, session=SID,
                                        timeout=5)
        except Exception as e:  # noqa: BLE001
            client = e
        try:
            srv = await asyncio.wait_for(accepted.get(), 0.5)
        except asyncio.TimeoutError:
            srv = None  # refused in the TLS handshake: the handler never ran
        return client, srv
    finally:
        server.close()
        await server.wait_closed()


def files(root, issued, ca_dir="a"):
    return root / ca_dir / "ca.pem", issued.cert, issued.key


async def test_mutual_tls_names_both_roles(pki):
    root, mine, _ = pki
    client, server = await _link(files(root, mine["model"]), files(root, mine["user"]))
    assert client.peer_cert.roles == ("model",) and server.peer_cert.roles == ("user",)
    assert client.peer_cert.subject == "model" and server.peer_cert.fingerprint == mine["user"].fingerprint
    check_pin(client.peer_cert, "model", {"model": mine["model"].fingerprint}, "model")
    with pytest.raises(TlsError, match="presented sha256:.* but this party pins sha256:0+ for the model role"):
        check_pin(client.peer_cert, "model", {"model": "sha256:" + "0" * 64}, "model")
    await client.close()
    await server.close()


async def test_unknown_ca_and_expired_certificate_are_refused(pki, caplog):
    root, mine, other = pki
    caplog.set_level(logging.WARNING, "permllm.net.transport")
    client, server = await _link(files(root, mine["model"]), (root / "a" / "ca.pem", other["user"].cert,
                                                                other["user"].key))
    assert isinstance(client, TlsError) and "refused this party's TLS certificate" in str(client)
    assert server is None and "unable to get local issuer certificate" in caplog.text
    now = dt.datetime.now(dt.timezone.utc)
    old = issue(root / "a", root / "a" / "ca.pem", root / "a" / "ca.key", "user", name="old",
                not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=2))
    client, server = await _link(files(root, mine["model"]), files(root, old))
    assert isinstance(client, TlsError) and server is None and "certificate has expired" in caplog.text
    # The client side: a server certificate from a CA the client does not trust.
    client, _ = await _link(files(root, other["model"], "b"), files(root, mine["user"]))
    assert isinstance(client, TlsError) and "certificate verify failed" in str(client)


async def test_claimed_role_must_be_the_certificates(pki):
    root, mine, _ = pki
    # A user presenting the helper's certificate while claiming to be the user.
    client, server = await _link(files(root, mine["model"]), files(root, mine["helper"]))
    assert isinstance(server, TlsError) and "says it is 'user', but its certificate 'helper'" in str(server)
    assert isinstance(client, HandshakeError) and "refused the connection: role mismatch" in str(client)
    # A server with the user's certificate answering as the model party.
    client, server = await _link(files(root, mine["user"]), files(root, mine["user"]))
    assert isinstance(client, TlsError) and "peer 'model' says it is 'model', but its certificate 'user'" in str(client)
    await server.close()
