"""The user party's OpenAI-compatible endpoint (``permllm serve user``) with the real ``openai`` client.

One deployment serves the module: a CA, a helper daemon, a model daemon serving a small
random LLaMA that carries SmolLM2-Instruct's tokenizer and chat template, and a user daemon
with two sessions, all real processes over loopback mutual TLS. Completions at temperature 0
must equal ``permllm generate`` and the async API; then concurrency, a client that leaves
mid-stream, each error case, a user daemon that reaches nobody, and (last) the helper going
down and coming back.
"""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import openai
import pytest
import torch

import permllm
from permllm.model.loaders import load_tokenizer

from .daemons import ENV, Proc, deployment_keys, free_port, tls_flags, user_settings

CHAT = ["Hello there", "Tell me a story.", "What is two plus two?"]
RAW = "Once upon a time"
N = 8  # tokens per completion


def _tiny_chat_llama(out: Path) -> Path:
    """A random 2-layer LLaMA with SmolLM2-Instruct's tokenizer (and its chat template), context 128."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer("smollm2")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=100, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500.0, initializer_range=0.2,
                      eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in m.named_parameters():  # varied (not repetitive) greedy text
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    m.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@dataclass
class Deployment:
    keys: dict
    tiny: Path
    helper: Proc
    model: Proc
    user: Proc
    root: Path

    def settings(self):
        return user_settings(self.keys, self.model.addr, self.helper.addr)

    def client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"http://{self.user.addr}/v1", api_key="any", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def dep(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    keys = deployment_keys(root / "keys")
    tiny = _tiny_chat_llama(root / "tiny")
    limits = ["--message-timeout", "30", "--drain-timeout", "10"]
    helper = Proc(["serve", "helper", "--listen", "127.0.0.1:0", *tls_flags(keys, "helper"), *limits],
                  root / "helper.log")
    model = Proc(["serve", "model", "--listen", "127.0.0.1:0", "--helper", helper.addr, "--model", str(tiny),
                  *tls_flags(keys, "model"), *limits], root / "model.log")
    user = Proc(["serve", "user", "--listen", "127.0.0.1:0", "--model-party", model.addr, "--helper", helper.addr,
                 "--model", str(tiny), "--max-sessions", "2", "--connect-retries", "2", "--connect-backoff", "0.05",
                 *tls_flags(keys, "user"), *limits], root / "user.log")
    d = Deployment(keys, tiny, helper, model, user, root)
    yield d
    codes = (user.terminate(), d.model.terminate(), d.helper.terminate())
    assert codes == (0, 0, 0), (codes, user.text()[-2000:])


@pytest.fixture(scope="module")
def want(dep) -> dict:
    """The async API's completions at temperature 0 for the same prompts."""
    async def run() -> dict:
        async with await permllm.connect(model=str(dep.tiny), settings=dep.settings()) as s:
            out = {}
            for p in CHAT:
                out[p] = "".join([t async for t in s.generate(p, N)])
            out[RAW] = "".join([t async for t in s.generate(RAW, N, chat=False)])
            return out
    return asyncio.run(run())


def chat(p: str) -> list[dict]:
    return [{"role": "user", "content": p}]


async def test_models_lists_the_model(dep):
    async with dep.client() as c:
        models = await c.models.list()
    assert [m.id for m in models.data] == ["tiny"]


async def test_chat_completion_equals_permllm_generate(dep, want):
    cli = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "permllm.cli", "generate", "--json", "--max-new-tokens", str(N),
                         "--model", str(dep.tiny), "--model-party", dep.model.addr, "--helper", dep.helper.addr,
                         *tls_flags(dep.keys, "user"), CHAT[0]], capture_output=True, text=True, timeout=120, env=ENV)
    assert cli.returncode == 0, cli.stderr[-2000:]
    text = json.loads(cli.stdout)["text"]
    assert text == want[CHAT[0]] and len(text) > 10
    async with dep.client() as c:
        r = await c.chat.completions.create(model="tiny", messages=chat(CHAT[0]), max_tokens=N, temperature=0)
        assert r.object == "chat.completion" and r.model == "tiny"
        assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == text
        assert r.choices[0].finish_reason == "length"
        assert r.usage.completion_tokens == N and r.usage.prompt_tokens > 20
        assert r.usage.total_tokens == r.usage.prompt_tokens + N
        stream = await c.chat.completions.create(model="tiny", messages=chat(CHAT[0]), max_tokens=N, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == N


async def test_raw_completion_equals_the_async_api(dep, want):
    async with dep.client() as c:
        r = await c.completions.create(model="tiny", prompt=RAW, max_tokens=N, temperature=0)
        assert r.object == "text_completion" and r.choices[0].text == want[RAW]
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == N
        stream = await c.completions.create(model="tiny", prompt=RAW, max_tokens=N, temperature=0, stream=True)
        chunks = [ch async for ch in stream]
    assert "".join(ch.choices[0].text for ch in chunks) == want[RAW]
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_sampling_parameters_are_applied(dep, want):
    """temperature samples (this model's flat distribution: never the greedy text); a top_p that keeps
    only the likeliest token is greedy again, whatever the seed."""
    async with dep.client() as c:
        hot, narrow = await asyncio.gather(*(
            c.chat.completions.create(model="tiny", messages=chat(CHAT[0]), max_tokens=N, temperature=1.0,
                                      top_p=top_p, seed=seed) for top_p, seed in ((1.0, 5), (1e-6, 7))))
    assert hot.choices[0].message.content != want[CHAT[0]]
    assert narrow.choices[0].message.content == want[CHAT[0]]


async def test_stop_sequences(dep, want):
    text = want[CHAT[0]]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = text[:text.find(stop)]
    async with dep.client() as c:
        r = await c.chat.completions.create(model="tiny", messages=chat(CHAT[0]), max_tokens=N, temperature=0,
                                            stop=[stop, "never in the text"])
        assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens < N  # the generation ended at the stop sequence
        stream = await c.chat.completions.create(model="tiny", messages=chat(CHAT[0]), max_tokens=N, temperature=0,
                                                 stop=stop, stream=True)
        chunks = [ch async for ch in stream]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_three_concurrent_requests_on_two_sessions(dep, want):
    start = len(dep.user.text())
    async with dep.client() as c:
        got = await asyncio.gather(*(c.chat.completions.create(model="tiny", messages=chat(p), max_tokens=N,
                                                               temperature=0) for p in CHAT))
    assert [r.choices[0].message.content for r in got] == [want[p] for p in CHAT]
    log = dep.user.text()[start:]
    assert "session 0: chat completion" in log and "session 1: chat completion" in log


async def test_a_client_that_leaves_mid_stream_ends_its_generation(dep, want):
    start, m_start = len(dep.user.text()), len(dep.model.text())
    async with dep.client() as c:
        stream = await c.chat.completions.create(model="tiny", messages=chat(CHAT[0]), max_tokens=60, temperature=0,
                                                 stream=True)
        seen = ""
        async for ch in stream:
            seen += ch.choices[0].delta.content or ""
            if len(seen) > 12:
                break
        await stream.close()
        assert want[CHAT[0]].startswith(seen)
        m = dep.user.wait_log(r"session \d: chat completion: \d+ prompt tokens, (\d+) tokens in [\d.]+ s "
                              r"\(the client left\)", start=start)
        assert int(m.group(1)) < 60
        # Both sessions serve good requests afterwards, neither set up again.
        got = await asyncio.gather(*(c.chat.completions.create(model="tiny", messages=chat(p), max_tokens=N,
                                                               temperature=0) for p in CHAT[:2]))
    assert [r.choices[0].message.content for r in got] == [want[p] for p in CHAT[:2]]
    assert "setting up a new one" not in dep.user.text()[start:]
    assert "ended:" not in dep.model.text()[m_start:]


def _is_error(body: dict, status: int, code: str | None, param: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    e = body["error"]
    assert e["code"] == code and e["type"] == ("invalid_request_error" if status < 500 else "server_error"), e
    assert param is None or e["param"] == param, e
    assert isinstance(e["message"], str) and e["message"]


LONG = " ".join(["word"] * 200)


@pytest.mark.parametrize("kwargs, status, code, param", [
    ({"model": "gpt-4o"}, 404, "model_not_found", "model"),
    ({"messages": chat(LONG)}, 400, "context_length_exceeded", "messages"),
    ({"max_tokens": 500}, 400, "context_length_exceeded", "messages"),
    ({"n": 2}, 400, "unsupported_parameter", "n"),
    ({"logprobs": True}, 400, "unsupported_parameter", "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, 400, "unsupported_parameter",
     "tools"),
    ({"presence_penalty": 0.5}, 400, "unsupported_parameter", "presence_penalty"),
    ({"extra_body": {"frobnicate": 1}}, 400, "unknown_parameter", "frobnicate"),
    ({"temperature": 3}, 400, "invalid_value", "temperature"),
    ({"temperature": "hot"}, 400, "invalid_type", "temperature"),
    ({"max_tokens": 0}, 400, "invalid_value", "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value", "stop"),
    ({"messages": []}, 400, "invalid_type", "messages"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": "1"}]}, 400, "unsupported_parameter",
     "messages[0].tool_call_id"),
    ({"messages": [{"role": "oracle", "content": "x"}]}, 400, "unsupported_value", "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}, 400,
     "unsupported_value", "messages[0].content"),
])
async def test_chat_errors(dep, kwargs, status, code, param):
    args = {"model": "tiny", "messages": chat("Hi"), "max_tokens": 4, **kwargs}
    async with dep.client() as c:
        with pytest.raises(openai.APIStatusError) as err:
            await c.chat.completions.create(**args)
    assert err.value.status_code == status
    _is_error(err.value.response.json(), status, code, param)


async def test_raw_http_errors(dep):
    url = f"http://{dep.user.addr}/v1"
    async with aiohttp.ClientSession() as http:
        cases = [("POST", "/chat/completions", b"{", 400, "invalid_json"),
                 ("POST", "/chat/completions", b"[1, 2]", 400, "invalid_type"),
                 ("POST", "/completions", json.dumps({"model": "tiny"}).encode(), 400, "missing_required_parameter"),
                 ("POST", "/completions", json.dumps({"model": "tiny", "prompt": ["a", "b"]}).encode(), 400,
                  "invalid_type"),
                 ("POST", "/completions", json.dumps({"model": "tiny", "prompt": LONG}).encode(), 400,
                  "context_length_exceeded"),
                 ("POST", "/completions", json.dumps({"prompt": "x"}).encode(), 400, "missing_required_parameter"),
                 ("POST", "/completions", b"{" + b" " * (4 << 20) + b"}", 413, None),
                 ("GET", "/chat/completions", b"", 405, "method_not_allowed"),
                 ("GET", "/engines", b"", 404, "not_found")]
        for method, path, body, status, code in cases:
            async with http.request(method, url + path, data=body,
                                    headers={"Content-Type": "application/json"}) as r:
                assert r.status == status, (path, body[:40], await r.text())
                _is_error(await r.json(), status, code)
    assert "Traceback" not in dep.user.text()


async def test_unreachable_parties_answer_503(dep, tmp_path):
    """A user daemon whose model party and helper do not answer still starts, and says why."""
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    user = Proc(["serve", "user", "--insecure", "--listen", "127.0.0.1:0", "--model-party", dead[0], "--helper",
                 dead[1], "--model", str(dep.tiny), "--connect-retries", "0"], tmp_path / "user.log")
    try:
        c = openai.AsyncOpenAI(base_url=f"http://{user.addr}/v1", api_key="any", max_retries=0, timeout=60)
        async with c:
            assert [m.id for m in (await c.models.list()).data] == ["tiny"]
            for _ in range(2):  # each request tries to set the session up again
                with pytest.raises(openai.InternalServerError) as err:
                    await c.completions.create(model="tiny", prompt=RAW, max_tokens=4)
                assert err.value.status_code == 503
                body = err.value.response.json()
                _is_error(body, 503, "service_unavailable")
                assert "cannot reach the model party" in body["error"]["message"]
    finally:
        assert user.terminate() == 0
    assert "Traceback" not in user.text()


async def test_a_speculating_user_daemon_gives_the_same_completions(dep, want, tmp_path):
    """speculate = "prompt-lookup" in the user's configuration file: verify passes, the same text."""
    conf = tmp_path / "user.toml"
    conf.write_text('speculate = "prompt-lookup"\ndraft_tokens = 3\n')
    user = Proc(["serve", "user", "--config", str(conf), "--listen", "127.0.0.1:0", "--model-party", dep.model.addr,
                 "--helper", dep.helper.addr, "--model", str(dep.tiny), *tls_flags(dep.keys, "user"),
                 "--message-timeout", "30"], tmp_path / "user.log")
    try:
        c = openai.AsyncOpenAI(base_url=f"http://{user.addr}/v1", api_key="any", max_retries=0, timeout=120)
        async with c:
            r = await c.completions.create(model="tiny", prompt=RAW, max_tokens=N, temperature=0)
            assert r.choices[0].text == want[RAW]
            r = await c.chat.completions.create(model="tiny", messages=chat(CHAT[0]), max_tokens=N, temperature=0)
            assert r.choices[0].message.content == want[CHAT[0]]
    finally:
        assert user.terminate() == 0
    passes = [int(n) for n in re.findall(r"(\d+) verify passes", user.text())]
    assert len(passes) == 2 and all(1 <= n <= N - 1 for n in passes), user.text()[-2000:]


def test_logs_hold_no_prompt_or_text(dep, want):
    log = dep.user.text()
    assert "Traceback" not in log and "Task exception was never retrieved" not in log
    for secret in [*CHAT, RAW, *(want[p].strip() for p in CHAT)]:
        assert secret not in log
    assert len(re.findall(r"session \d: (chat|text) completion: ", log)) > 10


async def test_helper_down_then_back(dep, want):
    """Runs last: the helper goes down (503, naming it), comes back on its port, and the user daemon
    sets its sessions up again."""
    port = dep.helper.port
    dep.helper.kill()
    start = len(dep.user.text())
    async with dep.client() as c:
        with pytest.raises(openai.InternalServerError) as err:
            await c.chat.completions.create(model="tiny", messages=chat(CHAT[0]), max_tokens=N, temperature=0)
        assert err.value.status_code == 503
        body = err.value.response.json()
        _is_error(body, 503, "service_unavailable")
        assert "helper" in body["error"]["message"], body
        dep.helper = Proc(["serve", "helper", "--listen", f"127.0.0.1:{port}", *tls_flags(dep.keys, "helper")],
                          dep.root / "helper2.log")
        got = await asyncio.gather(*(c.chat.completions.create(model="tiny", messages=chat(p), max_tokens=N,
                                                               temperature=0) for p in CHAT[:2]))
    assert [r.choices[0].message.content for r in got] == [want[p] for p in CHAT[:2]]
    assert len(re.findall(r"session \d: set up in", dep.user.text()[start:])) == 2
