"""Benchmarks behind ``permllm bench``: private vs plaintext, measured in the same run.

Targets:

* ``smollm2`` — SmolLM2-135M-Instruct end to end in the embedded mode (the real
  model): time to first token and online ms per generated token, against
  transformers' plaintext generation of the same prompt; ``gemma3-270m`` the same for
  Gemma 3 270M (with the token selection's share of a decode step: its vocabulary is
  262,144 entries).
* ``chatglm6b-layer`` — one full-size ChatGLM-6B decoder layer (hidden 4096, 32 heads,
  MLP 16384, random weights), prefill then decode steps, three parties over loopback
  TCP, against the plaintext layer in the same dtype.

Both report the keys of :data:`KEYS` (and more). Online times are measured with the
offline phase already done (it runs ahead in real use), so they are the latency a user
sees once the offline phase keeps up. On SmolLM2 both sides get a warm-up prefill and the
time to first token is the median of :data:`TTFT_REPS` prefills each (one sample on this
shared machine varies by ±20%).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from ..net import LinkEmulator
from ..protocols import Sampler, ShareConfig, ring, select_token, setup_weight
from ..protocols.embedding import TABLE_BITS
from .mesh import DealtInput, local_trio, run_offline, run_offline_batch, run_online, run_setup
from .session import DEALT_BATCH, offline_batches
from .profile import enable, op_kind

__all__ = ["KEYS", "TEXT", "TTFT_REPS", "prompt_ids", "bench_smollm2", "bench_model", "bench_chatglm_layer"]

EDGE_HOPS = 3 + 2 + 3  # per token besides the layers: embedding (one-hot, lift), final norm, token selection
KEYS = ("online_ms_per_token", "plaintext_ms_per_token", "offline_ms_per_token", "hops_per_layer",
        "hops_per_token", "online_bytes_per_token", "offline_bytes_per_token", "setup_bytes", "ttft_ms",
        "plaintext_ttft_ms")

TTFT_REPS = 3  # smollm2: time to first token is the median of this many prefills (each side, after a warm-up)

TEXT = ("The history of the city begins with a small settlement on the river, where traders met to exchange "
        "grain, salt and cloth. Over the centuries it grew into a busy port with markets, schools and bridges, "
        "and its people became known for their music, their gardens and their careful records of the weather. ")


def prompt_ids(tokenizer: Any | None, vocab: int, length: int) -> list[int]:
    """The bench's prompt of ``length`` tokens: :data:`TEXT` repeated, tokenized and cut (for a model without a
    tokenizer, TEXT's bytes modulo its vocabulary), so that the prompts of all lengths share a prefix."""
    text = TEXT * (1 + length // 40)
    if tokenizer is None:
        return [b % vocab for b in text.encode()][:length]
    return list(tokenizer.encode(text))[:length]


def _link(rtt_ms: float, bandwidth_mbit: float | None) -> LinkEmulator | None:
    return LinkEmulator.from_spec(rtt_ms, bandwidth_mbit) if rtt_ms or bandwidth_mbit else None


def _decode(records: list) -> list:
    """Online records of decode steps (every token but the first, the prefill)."""
    first = min((r.token for r in records), default=0)
    return [r for r in records if r.phase == "online" and r.token != first]


def _layer_hops(records: list) -> float:
    """Dependent hops per decoder layer in decode: the clock a layer ends at minus the one it starts at.

    A layer starts when the later of M and U has finished the previous layer (max over the
    parties of the clocks at its first op) and ends at the max clock reached in it.
    """
    return _span_hops(records, by_layer=True)


def _span_hops(records: list, by_layer: bool) -> float:
    """Mean dependent hops of a decode step (or of a layer in one): clock reached minus clock at start."""
    start: dict[tuple[int, int], dict[str, int]] = {}
    end: dict[tuple[int, int], int] = {}
    for r in _decode(records):
        layer, _ = op_kind(r.name)
        if by_layer and layer is None:
            continue
        key = (r.token, layer if by_layer else -1)
        start.setdefault(key, {}).setdefault(r.party, r.hops0)
        end[key] = max(end.get(key, 0), r.hops0 + r.hops)
    # A layer starts once both parties finished the previous one (max); a token's chain starts
    # at the earlier party (min), so the answer hop that ends the previous token is not counted twice.
    first = max if by_layer else min
    vals = [end[k] - first(s.values()) for k, s in start.items()]
    return float(np.mean(vals)) if vals else 0.0


async def bench_smollm2(tokens: int = 16, prompt_len: int = 64, rtt_ms: float = 0.0,
                        bandwidth_mbit: float | None = None, transport: str = "memory",
                        config: ShareConfig | None = None) -> dict[str, Any]:
    """SmolLM2 end to end: private (embedded) vs transformers, same prompt, same run."""
    return await bench_model("smollm2", tokens, prompt_len, rtt_ms, bandwidth_mbit, transport, config)


async def bench_model(model: str, tokens: int = 16, prompt_len: int = 64, rtt_ms: float = 0.0,
                      bandwidth_mbit: float | None = None, transport: str = "memory",
                      config: ShareConfig | None = None) -> dict[str, Any]:
    """A named model (:data:`~permllm.model.loaders.NAMED_MODELS`) end to end: private (embedded) vs
    transformers, same prompt, same run."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    from .. import local
    from ..model import load_model
    from ..model.loaders import model_dir

    lm = await asyncio.to_thread(load_model, model)
    ids = prompt_ids(lm.tokenizer, lm.arch.vocab, prompt_len)
    hf = AutoModelForCausalLM.from_pretrained(model_dir(model), dtype=torch.float32).eval()
    with torch.no_grad():  # plaintext: prefill then decode with the KV cache
        hf(torch.tensor([ids]))  # warm-up
        prefill = []
        for _ in range(TTFT_REPS):
            t0 = time.perf_counter()
            out = hf(torch.tensor([ids]), use_cache=True)
            nxt = int(out.logits[0, -1].argmax())
            prefill.append(time.perf_counter() - t0)
        ttft_plain = float(np.median(prefill))
        past, t1, plain_ids = out.past_key_values, time.perf_counter(), [nxt]
        for _ in range(tokens - 1):
            out = hf(torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
            past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
            plain_ids.append(nxt)
        plain_tok = (time.perf_counter() - t1) / max(tokens - 1, 1)
    del hf, out, past  # the three parties need the memory (Gemma's head and table: 262,144 rows)
    gc.collect()
    session = await local(lm, transport=transport, config=config, link=_link(rtt_ms, bandwidth_mbit))
    async with session:
        # a warm-up step on the same prompt, as for the plaintext model, then the prefills timed
        prefill = []
        for _ in range(1 + TTFT_REPS):
            [t async for t in session.generate_ids(ids, 1, stop_at_eos=False, offline_first=True)]
            prefill.append(session.last.step_s[0])
        ttft = float(np.median(prefill[1:]))
        records = enable(session.trio.parties)  # type: ignore[union-attr]
        got = [t async for t in session.generate_ids(ids, tokens, stop_at_eos=False, offline_first=True)]
        r = session.last
    recs = [x for rs in records for x in rs]
    steps = r.step_s
    dec = _decode(recs)
    n_dec = max(len(steps) - 1, 1)
    select = {}  # per decode token, the token selection's online wall time (the slower of M and U)
    for x in dec:
        if x.name == "select" and x.party in ("model", "user"):
            select[x.token] = max(select.get(x.token, 0.0), x.wall_s)
    online = float(np.mean(steps[1:] or steps))
    return {
        "target": model, "tokens": len(steps), "prompt_len": prompt_len, "rtt_ms": rtt_ms,
        "bandwidth_mbit": bandwidth_mbit, "dtype": session._user.p.config.dtype,
        "ttft_ms": 1e3 * ttft, "plaintext_ttft_ms": 1e3 * ttft_plain, "ttft_reps": TTFT_REPS,
        "online_ms_per_token": 1e3 * online,
        "select_ms_per_token": 1e3 * float(np.mean(list(select.values()))) if select else 0.0,
        "select_share": float(np.mean(list(select.values()))) / online if select else 0.0,
        "plaintext_ms_per_token": 1e3 * plain_tok,
        "offline_ms_per_token": 1e3 * float(np.mean(r.offline_step_s[1:] or r.offline_step_s)),
        "offline_prefill_ms": 1e3 * r.offline_step_s[0],
        "hops_per_layer": _layer_hops(recs), "hops_per_token": _span_hops(recs, by_layer=False),
        "online_bytes_per_token": sum(x.bytes_sent for x in dec) / n_dec,
        "offline_bytes_per_token": r.offline_bytes / len(steps),
        "setup_bytes": r.setup_bytes, "setup_s": r.setup_s,
        "greedy_identical": got == plain_ids,
    }


async def bench_chatglm_layer(tokens: int = 8, prompt_len: int = 64, rtt_ms: float = 0.0,
                              bandwidth_mbit: float | None = None, dtype: str = "float64",
                              seed: int = 0, route: str = "12") -> dict[str, Any]:
    """One full-size ChatGLM-6B layer: prefill ``prompt_len`` rows, then ``tokens`` decode steps.

    ``route`` picks the decode attention route ("12" or "8", see protocols/attention.py).
    """
    import torch

    from ..model import Forward, ModelWeights, PlainOps, PrivateOps, StepShape, from_chatglm, public_bounds
    from ..model.chatglm_ref import ChatGLMConfig, init_weights

    cfg = full = ChatGLMConfig.full()
    tensors = init_weights(cfg, seed=seed, dtype=torch.float32, layers=range(1))
    w = from_chatglm(cfg, tensors, layers=range(1))
    arch = w.arch
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(prompt_len, arch.hidden))] + [rng.normal(size=(1, arch.hidden)) for _ in range(tokens)]
    shapes = [StepShape(arch, prompt_len, s) for s in range(tokens + 1)]
    fwd = Forward(arch)
    # The public mask magnitudes: the plaintext layer's records (with the 8-hop route's extra
    # products), untimed.
    plain = PlainOps(w)
    for x, sh in zip(xs, shapes):
        await fwd.layer(plain, 0, x, sh)
    # The baseline: the plain layer alone, in the share dtype (weights cast to it once).
    timed = PlainOps(ModelWeights(arch, {k: np.asarray(v, dtype=dtype) for k, v in w.tensors.items()}))
    timed.attention = None  # type: ignore[assignment]  # no calibration products: the 12-hop composition
    plain_s = []
    for x, sh in zip(xs, shapes):
        t0 = time.perf_counter()
        await fwd.layer(timed, 0, x.astype(dtype), sh)
        plain_s.append(time.perf_counter() - t0)
    mags = public_bounds(plain.mags)
    config = ShareConfig(dtype, route=route)
    trio = await local_trio("tcp", config, link=_link(rtt_ms, bandwidth_mbit))
    async with trio:
        names = [f"L0.{n}" for n in ("qkv", "o", "mlp_in", "mlp_out")] + ["L0.res_in", "L0.res_post"]
        names += ["L0.qkv.b"] if route == "8" else []  # the 8-hop route's masked qkv bias
        for n in names:
            await run_setup(trio, lambda p, n=n: setup_weight(p, n, w[n] if p.is_model else None))
        setup_bytes = sum(p.meter.total("setup").bytes_sent for p in trio.parties)
        online_s, offline_s, hops, on_bytes, off_bytes = [], [], [], [], []
        inputs = [DealtInput(trio, f"x{step}", x, float(np.max(np.abs(x))) * 2) for step, x in enumerate(xs)]

        def graph_of(step: int) -> Any:
            async def graph(p: Any) -> Any:
                ops = PrivateOps(p, arch, mags, w if p.is_model else None, "g0.")
                return await fwd.layer(ops, 0, inputs[step].of(p), shapes[step])
            return graph
        # The offline phase as a session runs it: the prefill alone, then batches of decode steps.
        for batch in offline_batches(tokens + 1, DEALT_BATCH):
            for p in trio.parties:
                p.meter.reset()
            t0 = time.perf_counter()
            await run_offline_batch(trio, [(step, graph_of(step)) for step in batch])
            offline_s += [(time.perf_counter() - t0) / len(batch)] * len(batch)
            off_bytes += [sum(p.meter.total("offline").bytes_sent for p in trio.parties) / len(batch)] * len(batch)
            for step in batch:
                for p in trio.parties:
                    p.meter.reset()
                t0 = time.perf_counter()
                m, u = await run_online(trio, graph_of(step), step)
                online_s.append(time.perf_counter() - t0)
                hops.append(max(p.meter.hops("online") for p in (trio.model, trio.user)))
                on_bytes.append(sum(p.meter.total("online").bytes_sent for p in trio.parties))
                if step == 0:
                    want = await fwd.layer(PlainOps(w), 0, xs[0], shapes[0])
                    err0 = float(np.max(np.abs(m + u - want)))
        sel_on, sel_off = await _selection_bytes(trio, full.vocab_size, full.hidden_size, 30.0)
    dec = slice(1, None)
    layer_online = float(np.mean(online_s[dec]))
    per_token_bytes = 28 * float(np.mean(on_bytes[dec])) + sel_on
    return {
        "target": "chatglm6b-layer", "route": route, "tokens": tokens, "prompt_len": prompt_len, "rtt_ms": rtt_ms,
        "bandwidth_mbit": bandwidth_mbit, "dtype": dtype,
        "online_ms_per_token": 1e3 * layer_online, "plaintext_ms_per_token": 1e3 * float(np.mean(plain_s[dec])),
        "offline_ms_per_token": 1e3 * float(np.mean(offline_s[dec])), "offline_prefill_ms": 1e3 * offline_s[0],
        "ttft_ms": 1e3 * online_s[0], "plaintext_ttft_ms": 1e3 * plain_s[0],
        "hops_per_layer": float(np.mean(hops[dec])), "hops_per_token": 28 * float(np.mean(hops[dec])) + EDGE_HOPS,
        "online_bytes_per_token": per_token_bytes, "online_bytes_per_layer": float(np.mean(on_bytes[dec])),
        "offline_bytes_per_token": 28 * float(np.mean(off_bytes[dec])) + sel_off, "setup_bytes": setup_bytes,
        "selection_online_bytes": sel_on, "selection_offline_bytes": sel_off,
        "prefill_max_abs_err": err0, "ratio_online_to_plaintext": layer_online / float(np.mean(plain_s[dec])),
        "note": "per-token figures scale one layer to ChatGLM-6B's 28 layers and add one token selection "
                "at vocab 130528 (measured) and the next embedding's one-hot (2 bytes per vocab entry)",
    }


async def _selection_bytes(trio: Any, vocab: int, hidden: int, mag: float) -> tuple[float, float]:
    """Online and offline bytes of one token selection at this vocabulary (measured on ``trio``),
    the online ones plus the next embedding's (analytic: the embedding table itself is too large
    to build here): the masked one-hot (vocab ring words), the lift (hidden ring words) and U's
    real-number reshare (hidden float64 values)."""
    rng = np.random.default_rng(1)
    x = DealtInput(trio, "sel.logits", rng.normal(size=vocab) * mag / 4, mag)

    def graph(p: Any) -> Any:
        return select_token(p, "sel", x.of(p), sampler=Sampler(), rng=None, mag=mag, vocab=vocab)
    for p in trio.parties:
        p.meter.reset()
    await run_offline(trio, graph, 10_000)
    await run_online(trio, graph, 10_000)
    on = sum(p.meter.total("online").bytes_sent for p in trio.parties)
    off = sum(p.meter.total("offline").bytes_sent for p in trio.parties)
    return on + ring.wire_bytes(TABLE_BITS) * (vocab + hidden) + 8 * hidden, off
