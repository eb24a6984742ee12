"""The party daemons as real processes on loopback, over mutual TLS.

One deployment (a CA, a helper daemon and a model daemon serving a small random
LLaMA, at most 8 sessions) serves every test here: mTLS sessions that must give
transformers' greedy tokens, each TLS failure, handshake mismatches, 8
concurrent sessions plus a refused 9th, a user killed mid-generation; the last
test reads the daemons' logs for secrets.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import permllm
from permllm.net import HandshakeError, TlsError, packb, tcp_connect, unpackb
from permllm.net.tls import client_context
from permllm.protocols import Role, ShareConfig
from permllm.runtime.config import ConfigError
from permllm.runtime.identity import share_terms
from permllm.runtime.keys import issue, make_keys

from .daemons import ENV, Proc, deployment_keys, tls_flags, user_settings
from .test_generation import _llama_dir, hf_greedy

PROMPTS = [[5, 17, 42], [1, 2, 3, 4], [250, 7], [99, 123, 250, 7, 3], [11], [64, 128, 32], [3, 1, 4, 1, 5], [200, 100]]


@dataclass
class Deployment:
    keys: dict
    llama: Path
    hf: object
    helper: Proc
    model: Proc
    root: Path

    def settings(self, **over):
        return user_settings(self.keys, self.model.addr, self.helper.addr, **over)

    async def session(self, **over):
        return await permllm.connect(model=None, settings=self.settings(**over))


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    keys = deployment_keys(root / "keys")
    llama, hf = _llama_dir(root)
    limits = ["--max-sessions", "8", "--message-timeout", "30", "--drain-timeout", "10"]
    helper = Proc(["serve", "helper", "--listen", "127.0.0.1:0", *tls_flags(keys, "helper"), *limits],
                  root / "helper.log")
    model = Proc(["serve", "model", "--listen", "127.0.0.1:0", "--helper", helper.addr, "--model", str(llama),
                  *tls_flags(keys, "model"), *limits], root / "model.log")
    d = Deployment(keys, llama, hf, helper, model, root)
    yield d
    codes = (model.terminate(), helper.terminate())
    assert codes == (0, 0), (codes, model.text()[-2000:], helper.text()[-2000:])


def greedy(dep: Deployment, prompt: list[int], n: int) -> list[int]:
    return hf_greedy(dep.hf, prompt, n)


async def test_mtls_session_matches_transformers(dep):
    async with await dep.session() as s:
        ch = s._user.p.channels
        assert ch[Role.MODEL].peer_cert.roles == ("model",) and ch[Role.HELPER].peer_cert.roles == ("helper",)
        for prompt in PROMPTS[:2]:  # two generations in one session
            assert [t async for t in s.generate_ids(prompt, 12)] == greedy(dep, prompt, 12)
    dep.model.wait_log(r"finished after .* \(0 active\)")


async def test_speculation_against_daemons(dep):
    """Verify passes across the daemons (U's control maps over mutual TLS): transformers' ids."""
    from permllm.runtime.speculate import AdaptiveK, PromptLookup, Speculator

    prompt = PROMPTS[3] * 3
    async with await dep.session() as s:
        spec = Speculator(PromptLookup(), AdaptiveK(k_max=4))
        assert [t async for t in s.generate_ids(prompt, 16, speculate=spec)] == greedy(dep, prompt, 16)
        assert s.last.passes < 15


@pytest.fixture(scope="module")
def bad_certs(dep):
    """Certificates the deployment must refuse: another CA's, an expired one (right CA), another role's."""
    other = {i.role: i for i in make_keys(dep.root / "other-ca")}
    now = dt.datetime.now(dt.timezone.utc)
    k = dep.keys
    expired = issue(dep.root / "keys", k["ca"], k["ca"].with_suffix(".key"), "user", name="expired",
                    not_before=now - dt.timedelta(days=30), not_after=now - dt.timedelta(days=1))
    return {
        "unknown CA": (k["ca"], other["user"].cert, other["user"].key),
        "expired certificate": (k["ca"], expired.cert, expired.key),
        "wrong role": (k["ca"], k["helper.cert"], k["helper.key"]),
        "untrusted server": (other["user"].cert.parent / "ca.pem", other["user"].cert, other["user"].key),
    }


@pytest.mark.parametrize("case, error, server_log", [
    ("unknown CA", r"refused this party's TLS certificate", r"TLS handshake failed: certificate verify failed: "
                                                             r"unable to get local issuer certificate"),
    ("expired certificate", r"refused this party's TLS certificate",
     r"TLS handshake failed: certificate verify failed: certificate has expired"),
    ("wrong role", r"says it is 'user', but its certificate 'helper' .* names roles \['helper'\]",
     r"refused a connection from .*names roles \['helper'\]"),
    ("untrusted server", r"TLS handshake with peer 'model' .* failed: certificate verify failed", None),
])
async def test_mtls_refusals(dep, bad_certs, case, error, server_log):
    ca, cert, key = bad_certs[case]
    start = len(dep.model.text())
    with pytest.raises(TlsError if case != "wrong role" else HandshakeError, match=error):
        await dep.session(**{"tls__ca": str(ca), "tls__cert": str(cert), "tls__key": str(key)})
    if server_log:
        dep.model.wait_log(server_log, start=start)
    assert dep.model.alive() and dep.helper.alive()


async def test_plain_tcp_client_refused(dep):
    start = len(dep.model.text())
    with pytest.raises(HandshakeError, match="closed the connection during the handshake"):
        await dep.session(insecure=True)
    dep.model.wait_log(r"rejected a connection from .*: TLS handshake failed", start=start)


async def test_daemon_with_another_roles_certificate_is_refused(dep, tmp_path):
    """A helper that presents the user's certificate: the model party refuses it at start-up."""
    k = dep.keys
    helper = Proc(["serve", "helper", "--listen", "127.0.0.1:0", "--ca", str(k["ca"]), "--cert", str(k["user.cert"]),
                   "--key", str(k["user.key"])], tmp_path / "h.log")
    try:
        out = subprocess.run([sys.executable, "-m", "permllm.cli", "serve", "model", "--helper", helper.addr,
                              "--model", str(dep.llama), *tls_flags(k, "model")],
                             capture_output=True, text=True, timeout=120, env=ENV)
        assert out.returncode == 2
        assert re.search(r"error: role mismatch: peer 'helper' says it is 'helper', but its certificate 'user' "
                         r".* names roles \['user'\]", out.stderr), out.stderr[-2000:]
    finally:
        helper.kill()


@pytest.mark.parametrize("over, pattern", [
    ({"route": "12"}, r"route: this party \(model\) has '8', peer .* \(user\) has '12'"),
    ({"ratio": 1024.0}, r"ratio: this party \(model\) has 4096.0, peer .* \(user\) has 1024.0"),
    ({"model_fingerprint": "0" * 32}, r"model: this party \(model\) has '[0-9a-f]{32}', peer .* \(user\) has '0{32}'"),
])
async def test_handshake_mismatch(dep, over, pattern):
    start = len(dep.model.text())
    with pytest.raises(HandshakeError, match="refused the connection: handshake mismatch: " + pattern):
        await dep.session(**over)
    dep.model.wait_log("refused a connection from .*handshake mismatch: " + pattern, start=start)


async def _raw_hello(dep, hello: dict) -> dict:
    """Send one hello over mutual TLS with the user's certificate; return the model party's answer."""
    k = dep.keys
    host, port = dep.model.addr.rsplit(":", 1)
    t = await tcp_connect(host, int(port), ssl=client_context(k["ca"], k["user.cert"], k["user.key"]))
    try:
        await t.send(packb(hello))
        return unpackb(await asyncio.wait_for(t.recv(), 10))
    finally:
        await t.close()


TERMS = share_terms(ShareConfig())


async def test_handshake_version_terms_and_session_id_checks(dep):
    sid = "ab" * 16
    answer = await _raw_hello(dep, {"permllm": 1, "role": "user", "session": sid, "bind": True, "terms": TERMS})
    assert "protocol version mismatch: this party speaks 2, peer" in answer["error"] and "speaks 1" in answer["error"]
    answer = await _raw_hello(dep, {"permllm": 2, "role": "user", "session": "short", "bind": True, "terms": TERMS})
    assert "bad session id 'short'" in answer["error"]
    answer = await _raw_hello(dep, {"permllm": 2, "role": "helper", "session": sid, "bind": True, "terms": TERMS})
    assert "accepts ['user'], but the peer says it is 'helper'" in answer["error"]
    answer = await _raw_hello(dep, {"permllm": 2, "role": "user", "session": sid, "bind": True,
                                    "terms": {**TERMS, "dtype": "float32"}})
    assert re.search(r"handshake mismatch: dtype: this party \(model\) has 'float64', peer .* \(user\) has "
                     r"'float32'", answer["error"])
    with pytest.raises(ConfigError, match="dtype: float32 shares are refused"):  # this user never asks for it
        await dep.session(dtype="float32")
    answer = await _raw_hello(dep, {"permllm": 2, "role": "user", "session": sid, "bind": True,
                                    "terms": {"dtype": "float64"}})
    missing = ", ".join(sorted(set(TERMS) - {"dtype"}))
    assert f"the user party's hello does not state {missing}" in answer["error"]
    answer = await _raw_hello(dep, {"permllm": 2, "role": "user", "session": sid, "terms": TERMS})
    assert "frame binding mismatch: this party binds frames to the session, peer" in answer["error"]
    # A used session id cannot be replayed.
    async with await dep.session():
        sid = re.findall(r"session ([0-9a-f]{32}): user", dep.model.text())[-1]
    dep.model.wait_log(f"session {sid}: finished")
    answer = await _raw_hello(dep, {"permllm": 2, "role": "user", "session": sid, "bind": True, "terms": TERMS})
    assert f"session id {sid} was already used" in answer["error"]


async def test_eight_concurrent_sessions_and_busy(dep):
    sessions = await asyncio.gather(*(dep.session() for _ in range(8)))
    try:
        dep.model.wait_log(r"\(8 active\)")
        with pytest.raises(HandshakeError, match="busy: the model party already serves its maximum of 8 sessions"):
            await dep.session()

        async def run(s, prompt):
            return [t async for t in s.generate_ids(prompt, 16)]

        got = await asyncio.gather(*(run(s, p) for s, p in zip(sessions, PROMPTS)))
        for prompt, ids in zip(PROMPTS, got):
            assert ids == greedy(dep, prompt, 16)
        # Each session has its own seeds: no two users share a mask stream.
        seeds = {s._user.p._seeds["uh"] for s in sessions}
        assert len(seeds) == 8
    finally:
        await asyncio.gather(*(s.close() for s in sessions))
    dep.model.wait_log(r"finished after .* \(0 active\)")
    async with await dep.session() as s:  # a slot is free again
        assert [t async for t in s.generate_ids(PROMPTS[0], 4)] == greedy(dep, PROMPTS[0], 4)


def test_kill_user_mid_generation(dep):
    k = dep.keys
    m_start, h_start = len(dep.model.text()), len(dep.helper.text())
    user = subprocess.Popen([sys.executable, "-m", "permllm.cli", "generate", "--ids", "5 17 42", "--model",
                             str(dep.llama), "--model-party", dep.model.addr, "--helper", dep.helper.addr,
                             "--max-new-tokens", "50", "--rtt", "30", "--quiet", "--ca", str(k["ca"]),
                             "--cert", str(k["user.cert"]), "--key", str(k["user.key"])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    out = b""
    deadline = time.monotonic() + 60
    while out.count(b" ") < 3 and time.monotonic() < deadline and user.poll() is None:
        out += os.read(user.stdout.fileno(), 64)
    user.send_signal(signal.SIGKILL)
    user.wait(10)
    user.stdout.close()
    user.stderr.close()
    assert out.count(b" ") >= 3, "the user printed no tokens before the kill"
    assert [int(t) for t in out.split()[:3]] == greedy(dep, [5, 17, 42], 3)
    # Each of M and H learns it from its own link to the user or from the other's abort, whichever comes first
    # (H waits for the user's credits, M for the user's step control or for H's correlations).
    m = dep.model.wait_log(r"session ([0-9a-f]{32}): ended: (PeerClosed: (peer '[^']+' closed the connection|"
                           r"connection to peer '[^']+' was lost)|PeerAborted: peer 'helper' ended the session: "
                           r"the helper party ended session [0-9a-f]{32}: PeerClosed)", start=m_start)
    sid = m.group(1)
    dep.helper.wait_log(f"session {sid}: ended: (PeerClosed: peer '[^']+' closed the connection|PeerClosed: "
                        f"connection to peer '[^']+' was lost \\(.*\\)|PeerAborted: peer '[^']+' ended the session: "
                        f"the model party ended session {sid}: PeerClosed)", start=h_start)
    dep.model.wait_log(r"\(0 active\)", start=m_start)
    dep.helper.wait_log(r"\(0 active\)", start=h_start)
    assert dep.model.alive() and dep.helper.alive()
    prompt = [9, 8, 7]
    out = subprocess.run([sys.executable, "-m", "permllm.cli", "generate", "--json", "--ids", "9 8 7", "--model",
                          str(dep.llama), "--model-party", dep.model.addr, "--helper", dep.helper.addr,
                          "--max-new-tokens", "10", *tls_flags(k, "user")],
                         capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)["token_ids"] == greedy(dep, prompt, 10)


# Every log line of the daemons is one of these (permllm records), and none holds a prompt or token sequence.
LOG_LINES = [
    r"model \S+: \w+, \d+ layers, hidden \d+, vocab \d+; shares float\d+ at ratio [\d.e+]+, route \d+; "
    r"fingerprint [0-9a-f]{32}",
    r"helper at [\d.]+:\d+ answered the handshake",
    r"(model|helper) party listening on [\d.]+:\d+ \((mutual TLS|plain TCP: insecure)\)",
    r"model party at [\d.]+:\d+ checked in",
    r"session [0-9a-f]{32}: user [\d.]+:\d+ connected \(certificate '\w+'\) \(\d+ active\)",
    r"session [0-9a-f]{32}: (user|model) [\d.]+:\d+ connected, waiting for the (user|model) party",
    r"session [0-9a-f]{32}: model and user connected \(\d+ active\)",
    r"session [0-9a-f]{32}: finished after [\d.]+ s \(\d+ active\)",
    r"session [0-9a-f]{32}: (ended|dropped): .* \(\d+ active\)",
    r"refused a connection from [\d.]+:\d+: .*",
    r"rejected a connection from [\d.]+:\d+: TLS handshake failed: .*",
    r"draining: \d+ sessions running, waiting up to [\d.]+ s for them to finish",
    r"(model|helper) party stopped",
]
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (permllm[\w.]*) (\w+) (.*)$")


def check_log(text: str, secrets: list[list[int]]) -> int:
    """Every permllm record matches :data:`LOG_LINES`; no line holds a secret sequence or a traceback."""
    n = 0
    for line in text.splitlines():
        assert "Traceback" not in line and "Task exception was never retrieved" not in line, line
        for seq in secrets:
            for sep in (" ", ", ", ","):
                assert sep.join(map(str, seq)) not in line, f"token ids {seq} in a log line: {line!r}"
        m = RECORD.match(line)
        if m:
            n += 1
            assert any(re.fullmatch(p, m.group(3)) for p in LOG_LINES), f"log line not whitelisted: {line!r}"
    return n


def test_logs_hold_no_secrets(dep):
    """Runs last: everything the deployment logged during this module's sessions."""
    secrets = [p for p in PROMPTS if len(p) >= 3] + [greedy(dep, p, 16)[:4] for p in PROMPTS]
    records = check_log(dep.model.text(), secrets) + check_log(dep.helper.text(), secrets)
    assert records > 40
