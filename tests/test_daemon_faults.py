"""Faults injected into real daemon processes: a helper killed mid-generation and restarted,
SIGTERM with running and idle sessions, a helper that comes up late or never, TLS required
by default, a configuration file."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

import permllm
from permllm.net import LinkEmulator, NetError, PeerAborted

from .daemons import ENV, Proc, deployment_keys, free_port, tls_flags, user_settings
from .test_daemon import check_log
from .test_generation import _llama_dir, hf_greedy


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _llama_dir(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return deployment_keys(tmp_path_factory.mktemp("keys"))


def slow() -> LinkEmulator:
    """A user link with 10 ms one-way delay: about 0.15 s per token, so faults land mid-generation."""
    return LinkEmulator(0.01, None)


async def _tokens_until(gen, n: int, out: list[int]) -> None:
    async for t in gen:
        out.append(t)
        if len(out) == n:
            return


async def test_helper_killed_mid_generation_then_restarted(llama, keys, tmp_path):
    d, hf = llama
    helper = Proc(["serve", "helper", "--listen", "127.0.0.1:0", *tls_flags(keys, "helper")], tmp_path / "h1.log")
    port = helper.port
    model = Proc(["serve", "model", "--listen", "127.0.0.1:0", "--helper", helper.addr, "--model", str(d),
                  "--connect-retries", "2", "--connect-backoff", "0.05", *tls_flags(keys, "model")],
                 tmp_path / "m.log")
    settings = user_settings(keys, model.addr, helper.addr)
    try:
        prompt = [5, 17, 42]
        s = await permllm.connect(model=None, settings=settings, link=slow())
        got: list[int] = []
        gen = s.generate_ids(prompt, 40)
        await _tokens_until(gen, 2, got)
        helper.kill()
        with pytest.raises(NetError) as err:
            await _tokens_until(gen, 40, got)
        await s.close()
        assert "helper" in str(err.value), err.value
        assert got == hf_greedy(hf, prompt, 40)[:len(got)]
        model.wait_log(r"session [0-9a-f]{32}: ended: PeerClosed: peer 'helper' closed the connection")
        model.wait_log(r"\(0 active\)")
        assert model.alive()
        # While the helper is down, a new user is told so.
        with pytest.raises((NetError, ConnectionError), match="helper"):
            await permllm.connect(model=None, settings=settings)
        # The helper comes back on the same port: sessions work again.
        helper = Proc(["serve", "helper", "--listen", f"127.0.0.1:{port}", *tls_flags(keys, "helper")],
                      tmp_path / "h2.log")
        async with await permllm.connect(model=None, settings=settings) as s:
            assert [t async for t in s.generate_ids(prompt, 8)] == hf_greedy(hf, prompt, 8)
        assert model.terminate() == 0 and helper.terminate() == 0
        check_log(model.text() + helper.text() + (tmp_path / "h1.log").read_text(), [prompt])
    finally:
        model.kill()
        helper.kill()


async def test_sigterm_drains_running_sessions_and_ends_idle_ones(llama, tmp_path):
    """Plain TCP here (--insecure): the same daemons without TLS."""
    d, hf = llama
    helper = Proc(["serve", "helper", "--insecure", "--listen", "127.0.0.1:0"], tmp_path / "h.log")
    model = Proc(["serve", "model", "--insecure", "--listen", "127.0.0.1:0", "--helper", helper.addr, "--model",
                  str(d), "--drain-timeout", "8"], tmp_path / "m.log")
    settings = user_settings(None, model.addr, helper.addr)
    try:
        idle = await permllm.connect(model=None, settings=settings)
        busy = await permllm.connect(model=None, settings=settings, link=slow())
        prompt = [1, 2, 3, 4]
        got: list[int] = []
        gen = busy.generate_ids(prompt, 12)
        await _tokens_until(gen, 1, got)
        model.p.send_signal(15)  # SIGTERM
        model.wait_log("draining: 2 sessions running, waiting up to 8 s")
        with pytest.raises((ConnectionError, NetError)):  # no new sessions
            await permllm.connect(model=None, settings=user_settings(None, model.addr, helper.addr,
                                                                     limits__connect_retries=0))
        await _tokens_until(gen, 12, got)
        assert got == hf_greedy(hf, prompt, 12)  # the running generation finished
        await busy.close()
        assert await asyncio.to_thread(model.p.wait, 30) == 0  # the idle one was ended at the drain timeout
        with pytest.raises(PeerAborted, match="the model party ended session [0-9a-f]+: it is shutting down"):
            [t async for t in idle.generate_ids(prompt, 2)]
        await idle.close()
        log = model.text()
        assert "session" in log and "finished after" in log and "model party stopped" in log
        assert helper.terminate() == 0
    finally:
        model.kill()
        helper.kill()


def test_model_waits_for_a_late_helper(llama, keys, tmp_path):
    d, _ = llama
    port = free_port()
    model = Proc(["serve", "model", "--listen", "127.0.0.1:0", "--helper", f"127.0.0.1:{port}", "--model", str(d),
                  "--connect-retries", "30", "--connect-backoff", "0.1", "--max-backoff", "0.5",
                  *tls_flags(keys, "model")], tmp_path / "m.log", wait_ready=False)
    helper = None
    try:
        model.wait_log("fingerprint")  # the model is loaded and now knocking at the helper's port
        helper = Proc(["serve", "helper", "--listen", f"127.0.0.1:{port}", *tls_flags(keys, "helper")],
                      tmp_path / "h.log")
        model.wait_ready()
        model.wait_log(f"helper at 127.0.0.1:{port} answered the handshake")
    finally:
        model.kill()
        if helper:
            helper.kill()


def test_model_gives_up_on_an_absent_helper(llama, keys):
    d, _ = llama
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "permllm.cli", "serve", "model", "--helper", f"127.0.0.1:{port}",
                          "--model", str(d), "--connect-retries", "2", "--connect-backoff", "0.05",
                          *tls_flags(keys, "model")], capture_output=True, text=True, timeout=120, env=ENV)
    assert out.returncode == 2
    assert (f"error: cannot reach the helper: cannot connect to peer 'helper' at 127.0.0.1:{port} (3 attempts): "
            "Connection refused") in out.stderr


@pytest.mark.parametrize("argv", [
    ["serve", "helper"],
    ["generate", "--ids", "1 2", "--model-party", "127.0.0.1:1", "--helper", "127.0.0.1:2"],
])
def test_tls_is_on_by_default(argv):
    out = subprocess.run([sys.executable, "-m", "permllm.cli", *argv], capture_output=True, text=True, timeout=60,
                         env=ENV)
    assert out.returncode == 2
    assert "TLS is on by default and tls.ca, tls.cert, tls.key are not set" in out.stderr
    assert "--insecure" in out.stderr


def test_helper_from_a_config_file(keys, tmp_path):
    """Relative certificate paths, a [limits] table, and a flag overriding the file."""
    conf = keys["ca"].parent / "helper.toml"
    conf.write_text('listen = "127.0.0.1:0"\nlog_level = "WARNING"\n\n'
                    '[tls]\nca = "ca.pem"\ncert = "helper.pem"\nkey = "helper.key"\n\n'
                    '[limits]\nmax_sessions = 3\npairing_timeout = 5\n')
    helper = Proc(["serve", "helper", "--config", str(conf), "--log-level", "INFO"], tmp_path / "h.log")
    try:
        helper.wait_log(r"helper party listening on 127\.0\.0\.1:\d+ \(mutual TLS\)")  # INFO: the flag won
    finally:
        assert helper.terminate() == 0
