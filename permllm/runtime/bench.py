"""Benchmarks behind ``permllm bench``: private vs plaintext, measured in the same run.

Targets:

* ``smollm2`` — SmolLM2-135M-Instruct end to end in the embedded mode (the real
  model): time to first token and online ms per generated token, against
  transformers' plaintext generation of the same prompt; ``gemma3-270m`` the same for
  Gemma 3 270M (with the token selection's share of a decode step: its vocabulary is
  262,144 entries).
* ``chatglm6b-layer`` — one full-size ChatGLM-6B decoder layer (hidden 4096, 32 heads,
  MLP 16384, random weights), prefill then decode steps, three parties over loopback
  TCP, against the plaintext layer in the same dtype, on the ring (the default) or real
  numbers and either decode route; per token it adds a token's edges (embedding lookup,
  final norm, token selection over the 130,528-entry vocabulary).

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
from ..model.forward import EDGE_HOPS
from ..protocols import Sampler, ShareConfig, ring, select_token, setup_weight
from ..protocols.config import RING_BITS
from .mesh import DealtInput, local_trio, run_offline, run_offline_batch, run_online, run_setup
from .session import DEALT_BATCH, offline_batches
from .profile import enable, op_kind

__all__ = ["KEYS", "TEXT", "TTFT_REPS", "prompt_ids", "bench_smollm2", "bench_model", "bench_chatglm_layer"]

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
    # Per decode token, token selection's share of the step's critical path: the model party's select op, from
    # its logits share to its answer (U's select op also waits for M's head linear, which is not selection).
    select = {x.token: x.wall_s for x in dec if x.name == "select" and x.party == "model"}
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
                              bandwidth_mbit: float | None = None, dtype: str = "float64", seed: int = 0,
                              route: str = "auto", arith: str = "auto", cfg: Any = None) -> dict[str, Any]:
    """One full-size ChatGLM-6B layer (``cfg``: another ChatGLMConfig, e.g. a test's small one): prefill
    ``prompt_len`` rows, then ``tokens`` decode steps, three parties over loopback TCP, against the plaintext
    layer in the same run.

    ``arith`` and ``route`` are ShareConfig's ("auto": the ring, and on it the 8-hop route). The public bounds
    come from the plaintext layer on an independent draw of inputs (as :func:`~permllm.model.calibrate` uses
    pseudo-random tokens, never the prompt), and the ring's plan from them as a session chooses it
    (:func:`~permllm.model.forward.resolve_arith` of the layer: its precision and U's reshare rings); a value
    beyond its bound stops the run with RingOverflow. Per token: one layer's figures times the model's layers, plus a token's edges
    (:func:`_edges`: the embedding lookup, the final norm and the token selection over the vocabulary).
    """
    import torch

    from ..model import Forward, ModelWeights, PlainOps, PrivateOps, StepShape, from_chatglm, public_bounds
    from ..model.chatglm_ref import ChatGLMConfig, init_weights
    from ..model.forward import Fx, layer_output, layer_weight_names, resolve_arith, weight_fracs, wide_weights
    from ..protocols import crt

    cfg = cfg or ChatGLMConfig.full()
    w = from_chatglm(cfg, init_weights(cfg, seed=seed, dtype=torch.float32, layers=range(1)), layers=range(1))
    arch = w.arch
    rng = np.random.default_rng(seed)
    xs, cal = ([rng.normal(size=(prompt_len, arch.hidden))] + [rng.normal(size=(1, arch.hidden))
                                                               for _ in range(tokens)] for _ in range(2))
    shapes = [StepShape(arch, prompt_len, s) for s in range(tokens + 1)]
    fwd = Forward(arch)
    # The public bounds: the plaintext layer's records on the calibration draw (with the 8-hop route's extra
    # products), and the head's on that layer's outputs, untimed.
    plain = PlainOps(w)
    cal_out = [await fwd.layer(plain, 0, x, sh) for x, sh in zip(cal, shapes)]
    head = PlainOps(_head_weights(cfg, arch, seed))
    for y in cal_out:
        await fwd.head(head, y.astype(np.float32))  # float32: the 130,528 × 4096 table is not copied to float64
    mags = public_bounds({**plain.mags, **head.mags})
    # The baseline and the reference outputs: the plain layer alone, in the share dtype.
    timed = PlainOps(ModelWeights(arch, {k: np.asarray(v, dtype=dtype) for k, v in w.tensors.items()}))
    timed.attention = None  # type: ignore[assignment]  # no calibration products: the 12-hop composition
    plain_s, want = [], []
    for x, sh in zip(xs, shapes):
        t0 = time.perf_counter()
        want.append(await fwd.layer(timed, 0, x.astype(dtype), sh))
        plain_s.append(time.perf_counter() - t0)
    logits = (await fwd.head(head, want[-1].astype(np.float32))).astype(np.float64).reshape(-1)
    config = ShareConfig(dtype, route=route, arith=arith)
    rt = config.attention_route
    kind, plan = resolve_arith(arith, config.ring_possible, w, mags, rt, layer=0)
    fracs = weight_fracs(arch, w, plan, rt, layer=0) if plan is not None else {}
    scale = logits_enc = None
    bits = RING_BITS
    if plan is not None:  # the layer's input at the scale and ring its output has (every layer's but the first)
        budget = PrivateOps(None, arch, mags, None, "", plan=plan, fracs={**fracs, **_head_fracs(head.w, plan)})
        out = layer_output(budget, 0)
        scale, bits = out.scale, out.bits
        lg = await fwd.head(budget, out)
        logits_enc = ring.Enc(lg.scale, lg.bits, budget._range("logits"))
    del head, plain, timed
    trio = await local_trio("tcp", config, link=_link(rtt_ms, bandwidth_mbit))
    async with trio:
        for p in trio.parties:
            p.ring = plan is not None
        biases = ModelWeights(arch, {k: v for k, v in w.tensors.items() if k.endswith(".b")})  # what M's ops read
        wide = set(wide_weights(arch, rt)) if plan is not None and plan.wide else set()
        for n, _ in layer_weight_names(arch, 0, rt):
            await run_setup(trio, lambda p, n=n: setup_weight(p, n, w[n] if p.is_model else None,
                                                              frac=fracs.get(n)))
            for i, q in enumerate(crt.PRIMES if n in wide else ()):  # the attention block's, mod each prime too
                await run_setup(trio, lambda p, n=n, i=i, q=q: setup_weight(
                    p.residue(q), f"{n}#q{i}", w[n] if p.is_model else None, frac=fracs[n]))
            del w.tensors[n]  # the parties hold it now: one copy fewer at the peak (a full-size layer, ~1.6 GB)
        setup_bytes = sum(p.meter.total("setup").bytes_sent for p in trio.parties)
        del w
        records = enable(trio.parties)
        online_s, offline_s, hops, on_bytes, off_bytes, errs = [], [], [], [], [], []
        inputs = [DealtInput(trio, f"x{step}", x, float(np.max(np.abs(x))) * 2, scale) for step, x in enumerate(xs)]

        def graph_of(step: int) -> Any:
            async def graph(p: Any) -> Any:
                ops = PrivateOps(p, arch, mags, biases if p.is_model else None, "g0.", plan=plan)
                x = inputs[step].of(p)
                return await fwd.layer(ops, 0, x if plan is None else Fx(x, scale, bits), shapes[step])
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
                got = m + u if plan is None else ring.decode(m.v + u.v, m.scale, m.bits, "the layer's output")
                errs.append(float(np.max(np.abs(got - want[step]))))
        by_op: dict[str, float] = {}
        by_msg: dict[str, float] = {}  # per op kind and message ("kind.part", a prime's lane "#q…")
        for r in _decode([x for rs in records for x in rs]):
            k = op_kind(r.name)[1]
            by_op[k] = by_op.get(k, 0.0) + r.bytes_sent / tokens
            for m, n in r.by_message.items():
                by_msg[f"{k}: {m}"] = by_msg.get(f"{k}: {m}", 0.0) + n / tokens
        for p in trio.parties:
            p.trace = None
        edges_on, edges_off = await _edges(trio, arch, mags, plan, (scale, bits), logits_enc, want[-1][-1:], logits)
    dec = slice(1, None)
    layer_online = float(np.mean(online_s[dec]))
    layer_bytes = float(np.mean(on_bytes[dec]))
    L = cfg.num_layers
    return {
        "target": "chatglm6b-layer", "arith": kind, "route": rt, "plan": None if plan is None else plan.to_list(),
        "tokens": tokens, "prompt_len": prompt_len, "rtt_ms": rtt_ms, "bandwidth_mbit": bandwidth_mbit,
        "dtype": dtype, "layers": L,
        "online_ms_per_token": 1e3 * layer_online, "plaintext_ms_per_token": 1e3 * float(np.mean(plain_s[dec])),
        "offline_ms_per_token": 1e3 * float(np.mean(offline_s[dec])), "offline_prefill_ms": 1e3 * offline_s[0],
        "ttft_ms": 1e3 * online_s[0], "plaintext_ttft_ms": 1e3 * plain_s[0],
        "hops_per_layer": float(np.mean(hops[dec])), "hops_per_token": L * float(np.mean(hops[dec])) + EDGE_HOPS,
        "online_bytes_per_token": L * layer_bytes + sum(edges_on.values()), "online_bytes_per_layer": layer_bytes,
        "online_bytes_per_layer_by_op": by_op, "online_bytes_per_layer_by_message": by_msg,
        "online_bytes_edges": edges_on,
        "offline_bytes_per_token": L * float(np.mean(off_bytes[dec])) + sum(edges_off.values()),
        "offline_bytes_per_layer": float(np.mean(off_bytes[dec])), "offline_bytes_edges": edges_off,
        "setup_bytes": setup_bytes,
        "prefill_max_abs_err": errs[0], "decode_max_abs_err": max(errs[1:], default=0.0),
        "output_max_abs": float(max(np.max(np.abs(y)) for y in want)),
        "ratio_online_to_plaintext": layer_online / float(np.mean(plain_s[dec])),
        "note": f"per-token bytes and hops: one decode layer's (measured, all three parties, frames included) times "
                f"{L} layers, plus a token's edges (online_bytes_edges: the final norm and the token selection over "
                f"the {arch.vocab}-entry vocabulary measured at that shape, the embedding lookup measured on three "
                "small tables and combined, its messages being vocabulary- or hidden-sized); the per-op and "
                "per-message breakdowns are of one decode layer (per op: payload bytes without frames)",
    }


def _head_weights(cfg: Any, arch: Any, seed: int) -> Any:
    """The head of the benchmark's model (``final`` norm affine, ``embed`` the tied table, float32): the
    tensors a full init draws (:func:`~permllm.model.chatglm_ref.init_tensor`), for the edges' bounds."""
    from ..model import ModelWeights
    from ..model.chatglm_ref import init_tensor

    t = {k: init_tensor(f"transformer.{n}", shape, seed).numpy() for k, n, shape in (
        ("final", "final_layernorm.weight", (cfg.hidden_size,)),
        ("final.b", "final_layernorm.bias", (cfg.hidden_size,)),
        ("embed", "word_embeddings.weight", (cfg.vocab_size, cfg.hidden_size)))}
    return ModelWeights(arch, t)


def _head_fracs(weights: Any, plan: Any) -> dict[str, int]:
    """The head's fractional bits under ``plan``, as :func:`~permllm.model.forward.weight_fracs` sets them (the
    table's public scale from its extremes: no |table|-sized temporary)."""
    from ..protocols.linear import public_scale, weight_frac

    return {n: weight_frac(public_scale(np.array([weights[n].min(), weights[n].max()], dtype=np.float64)), plan.wb)
            for n in ("final", "embed")}


async def _edges(trio: Any, arch: Any, mags: dict[str, float], plan: Any, out: tuple[int | None, int], enc: Any,
                 x_last: np.ndarray, logits: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    """Online and offline bytes of a token's edges, measured on ``trio`` (all three parties, frames included):
    the final norm of the last layer's output row ``x_last`` (on the ring at the layer output's ``out``: scale,
    ring bits) and
    the token selection over ``logits`` (at ``enc``), both at the model's shapes, and the embedding lookup of
    one id (:func:`_lookup_bytes`). The two linears between the norm and the selection send nothing online."""
    from ..model import PrivateOps
    from ..model.forward import Fx

    xin = DealtInput(trio, "edge.x", x_last, mags["final.x"], out[0])

    def final_norm(p: Any) -> Any:
        x = xin.of(p)
        return PrivateOps(p, arch, mags, None, "e.", plan=plan).norm(
            "final.n", x if plan is None else Fx(x, *out), "final.x", (1, arch.hidden))
    sel = DealtInput(trio, "edge.logits", logits, mags["logits"], None if enc is None else enc.scale)

    def select(p: Any) -> Any:
        return select_token(p, "select", sel.of(p), sampler=Sampler(), rng=None, mag=mags["logits"],
                            vocab=arch.vocab, enc=enc)
    on, off = {}, {}
    for name, graph, token in (("final_norm", final_norm, 10_000), ("token_selection", select, 10_001)):
        on[name], off[name] = await _measure(trio, graph, token)
    on["embedding"], off["embedding"] = await _lookup_bytes(trio, arch.vocab, arch.hidden,
                                                            None if plan is None else plan.emb)
    return on, off


async def _measure(trio: Any, graph: Any, token: int) -> tuple[float, float]:
    """(online, offline) bytes sent by all three parties in one run of ``graph`` at ``token``."""
    for p in trio.parties:
        p.meter.reset()
    await run_offline(trio, graph, token)
    await run_online(trio, graph, token)
    return (float(sum(p.meter.total("online").bytes_sent for p in trio.parties)),
            float(sum(p.meter.total("offline").bytes_sent for p in trio.parties)))


async def _lookup_bytes(trio: Any, vocab: int, hidden: int, out_scale: int | None,
                        small: int = 8) -> tuple[float, float]:
    """(online, offline) bytes of the embedding lookup of one id in a (vocab × hidden) table, measured on three
    tables — (vocab × small), (small × hidden), (small × small) — and combined as B(V, h) = B(V, s) + B(s, h) −
    B(s, s): every message of the lookup is vocabulary-sized (U's masked one-hot) or hidden-sized (the products,
    the lift, the reshare), so its bytes are affine in each, and the full table (534 M entries at ChatGLM-6B's
    shape, a copy per party) is never built."""
    from ..protocols import embed
    from ..protocols.embedding import setup_table

    rng = np.random.default_rng(2)
    got = []
    for i, (v, h) in enumerate(((vocab, small), (small, hidden), (small, small))):
        name = f"edge.table{i}"
        table = rng.normal(size=(v, h)) * 0.02
        await run_setup(trio, lambda p: setup_table(p, name, table if p.is_model else None, shape=(v, h)))

        def lookup(p: Any) -> Any:
            ids = [v // 2] if p.is_user and p.phase == "online" else None
            return embed(p, f"edge.embed{i}", ids, weight="embed", table=name, vocab=v, n_tokens=1, mag_out=1.0,
                         out_scale=out_scale)
        got.append(await _measure(trio, lookup, 10_002 + i))
        for p in trio.parties:
            del p.weights[name]
    (a_on, a_off), (b_on, b_off), (c_on, c_off) = got
    return a_on + b_on - c_on, a_off + b_off - c_off
