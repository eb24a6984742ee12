"""Fidelity and speed of private generation on SmolLM2-135M-Instruct vs plaintext transformers.

For each share setting (dtype, mask ratio R) it runs greedy private generation in
the embedded mode and reports: token agreement with transformers' greedy ids, the
max abs error of the logits at every step (M's and U's shares of the logits are
summed here, in this one process, purely for measurement), tokens/s of the online
phase, and plaintext tokens/s measured in the same run. Usage:

    .venv/bin/python bench/generation.py [--tokens 32] [--json] [--settings float64:4096 ring ...]
        [--routes 12 8]

A setting is ``float64:R`` (real-number shares, mask ratio R: ``arith="float"``) or ``ring`` (exact ring
shares at the precision plan the model party chooses, the default: ``ShareConfig(arith="ring")``).

``--routes`` runs every setting with each attention route (ShareConfig.route: "12" — separate
norm, q·Kᵀ, softmax and P·V ops — or "8", the fused decode op of protocols/attention.py);
the decode columns leave out the prompt step (it takes the 12-hop ops on both routes).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time

import numpy as np
import torch

import permllm
from permllm.model import load_model
from permllm.model.loaders import smollm2_dir
from permllm.protocols import ShareConfig, ring
from permllm.runtime import session as S

PROMPT = "Write a short story about a robot who learns to paint."


def hf_run(hf, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray], float]:
    """Greedy ids, per-step logits and seconds per token of plaintext transformers (float32)."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        t0 = time.perf_counter()
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        dt = time.perf_counter() - t0
        gen = out[0, len(prompt):].tolist()
        full = hf(torch.tensor([prompt + gen])).logits[0].double().numpy()
    for i in range(len(gen)):
        logits.append(full[len(ids) - 1 + i])
    return gen, logits, dt / len(gen)


async def private_run(lm, prompt: list[int], n: int, config: ShareConfig, link=None) -> dict:
    captured: dict[int, dict[str, np.ndarray]] = {}
    hops: dict[int, int] = {}
    orig = S.select_token

    async def spy(p, name, logits, **kw):  # measurement only: sum the two shares of the logits
        if p.phase == "online" and logits is not None:
            captured.setdefault(p.token, {})[p.role.value] = np.array(logits)
            captured[p.token]["enc"] = kw.get("enc")
            hops[p.token] = max(hops.get(p.token, 0), p.meter.hops("online"))
        return await orig(p, name, logits, **kw)

    S.select_token = spy
    try:
        async with await permllm.local(lm, config=config, link=link) as s:
            ids, stamps = [], [time.perf_counter()]
            async for t in s.generate_ids(prompt, n):
                ids.append(t)
                stamps.append(time.perf_counter())
            res = s.last
    finally:
        S.select_token = orig
    logits = [_logits(captured[k]) for k in sorted(captured)]
    h = [hops[k] for k in sorted(hops)]
    decode_hops = [b - a for a, b in zip(h, h[1:])]  # hop clock at each selection: one token apart
    return {"ids": ids, "logits": logits, "online_s": res.online_s, "offline_s": res.offline_s,
            "online_bytes": res.online_bytes, "offline_bytes": res.offline_bytes, "setup_s": res.setup_s,
            "setup_bytes": res.setup_bytes, "hops": res.online_hops,
            "decode_s": stamps[-1] - stamps[1] if len(stamps) > 2 else 0.0,
            "decode_hops_per_token": max(decode_hops) if decode_hops else 0}


def _logits(c: dict) -> np.ndarray:
    """The logits from their two shares (real numbers, or ring words decoded at their encoding)."""
    e = c.get("enc")
    if e is None:
        return c["model"] + c["user"]
    return ring.decode(c["model"] + c["user"], e.scale, e.bits, "logits")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--settings", nargs="+", default=["float64:4096", "float64:16384", "float64:65536"])
    ap.add_argument("--routes", nargs="+", choices=["12", "8"], default=["12"], help="attention routes to run")
    ap.add_argument("--rtt", type=float, default=0.0, help="emulated round-trip time per link, ms")
    ap.add_argument("--bandwidth", type=float, default=None, help="emulated bandwidth per link, Mbit/s")
    a = ap.parse_args()
    lm = load_model("smollm2")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    tok = lm.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    prompt = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want, want_logits, plain_s = hf_run(hf, prompt, a.tokens)
    rows = []
    for spec, route in [(sp, rt) for sp in a.settings for rt in a.routes]:
        dtype, ratio = spec.split(":") if spec != "ring" else ("ring", "0")
        cfg = ShareConfig(arith="ring", route=route) if spec == "ring" else ShareConfig(
            dtype, float(ratio), route=route, arith="float")
        link = None
        if a.rtt or a.bandwidth:
            from permllm.net import LinkEmulator
            link = LinkEmulator.from_spec(rtt_ms=a.rtt, bandwidth_mbit=a.bandwidth)
        r = asyncio.run(private_run(lm, prompt, a.tokens, cfg, link))
        agree = 0
        for x, y in zip(r["ids"], want):
            if x != y:
                break
            agree += 1
        # logits are comparable while the sequences agree
        errs = [float(np.max(np.abs(g - w))) for g, w in zip(r["logits"][:agree + 1], want_logits)]
        n = len(r["ids"])
        rows.append({"dtype": dtype, "ratio": float(ratio), "route": route, "rtt_ms": a.rtt, "tokens": n,
                     "agree_prefix": agree,
                     "identical": r["ids"] == want, "max_logit_err": max(errs),
                     "logit_range": float(np.ptp(want_logits[0])),
                     "online_ms_per_token": 1e3 * r["online_s"] / n, "offline_ms_per_token": 1e3 * r["offline_s"] / n,
                     "plaintext_ms_per_token": 1e3 * plain_s, "private_tok_s": n / r["online_s"],
                     "plaintext_tok_s": 1 / plain_s, "online_bytes_per_token": r["online_bytes"] / n,
                     "offline_bytes_per_token": r["offline_bytes"] / n, "hops": r["hops"],
                     "setup_s": r["setup_s"], "setup_bytes": r["setup_bytes"],
                     "decode_ms_per_token": 1e3 * r["decode_s"] / max(n - 1, 1),
                     "decode_hops_per_token": r["decode_hops_per_token"]})
    if a.json:
        print(json.dumps(rows, indent=1))
        return
    print(f"prompt: {len(prompt)} tokens, {a.tokens} new tokens, plaintext transformers float32: "
          f"{1 / plain_s:.1f} tok/s")
    print(f"{'dtype':>8}{'R':>8}{'route':>6}{'identical':>10}{'agree':>7}{'max|Δlogit|':>13}{'tok/s':>8}"
          f"{'plain tok/s':>12}{'decode ms/tok':>14}{'hops/tok':>9}{'online MB/tok':>14}{'offline MB/tok':>15}"
          f"{'hops':>7}")
    for r in rows:
        print(f"{r['dtype']:>8}{r['ratio']:>8.0f}{r['route']:>6}{str(r['identical']):>10}{r['agree_prefix']:>7}"
              f"{r['max_logit_err']:>13.2e}{r['private_tok_s']:>8.2f}{r['plaintext_tok_s']:>12.1f}"
              f"{r['decode_ms_per_token']:>14.1f}{r['decode_hops_per_token']:>9}"
              f"{r['online_bytes_per_token'] / 1e6:>14.2f}{r['offline_bytes_per_token'] / 1e6:>15.2f}{r['hops']:>7}")


if __name__ == "__main__":
    main()
