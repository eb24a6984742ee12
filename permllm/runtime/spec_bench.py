"""``permllm bench MODEL --speculate …``: private generation with and without speculative decoding, same run.

One embedded session (three parties, one process) generates on each prompt of two kinds — copying or
extraction tasks (quote, fix a typo, list, rewrite) and open questions — at each emulated round-trip
time, once by plain decoding and once with verify passes of U's drafts (:mod:`.speculate`), on the
same links, and reports per kind and RTT:

* online hops per generated token (the prefill's first token excluded: it is the same in both runs);
* online seconds per generated token, the offline phase done first (the bench's convention,
  :mod:`.bench`; a pass's just-in-time offline phase taken out), and wall seconds as a user waits for
  the tokens (a second generation: decoding's offline phase runs ahead of it, a pass's alongside it);
* the verify passes, drafts and accepted drafts, and whether both runs gave the same ids as
  transformers' greedy decoding of the same prompt (they must).

The hops of a prompt's prefill are measured once per prompt (a one-token generation) and subtracted;
hops do not depend on the network, so every RTT reports the same hop counts.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Sequence

import numpy as np

from ..net import LinkEmulator
from ..protocols import ShareConfig
from .api import encode_prompt
from .speculate import Drafter

__all__ = ["PROMPTS", "bench_speculate", "format_speculate"]

PROMPTS = {
    "copy": [
        "Repeat the following text exactly: The committee will meet on Tuesday at ten o'clock in the main hall "
        "to discuss the budget for next year and the plans for the new library.",
        "Fix the typo in: The weather was beautifull yesterday, so we walked along the river and had lunch in "
        "the park near the old bridge.",
        "List the items in this sentence: For the trip I packed a tent, a sleeping bag, two flashlights, a water "
        "filter, a map and a first aid kit.",
        "Rewrite this sentence in the past tense: Every morning she opens the shop, waters the plants, counts "
        "the money in the till and waits for the first customer.",
    ],
    "open": [
        "What is the capital of France?",
        "Write a short story about a robot who learns to paint.",
        "Why is the sky blue?",
        "Give me three tips for learning a new language.",
    ],
}


def _greedy(model: str, prompts: list[list[int]], tokens: int, eos: set[int]) -> list[list[int]]:
    """transformers' greedy ids (float32) for each prompt, up to ``tokens``, stopping after an end id."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..model.loaders import model_dir

    hf = AutoModelForCausalLM.from_pretrained(model_dir(model), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            got = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=tokens, do_sample=False, eos_token_id=sorted(eos) or None,
                              pad_token_id=sorted(eos)[0] if eos else None)[0, len(ids):].tolist()
            out.append([int(t) for t in got])
    return out


async def _run(session: Any, ids: list[int], tokens: int, spec: Any, offline_first: bool) -> dict[str, Any]:
    """One generation: its ids, hops and seconds for the tokens after the first — online alone with
    ``offline_first`` (a pass's just-in-time offline phase taken out), else as a user waits for them."""
    got = [t async for t in session.generate_ids(ids, tokens, offline_first=offline_first, speculate=spec)]
    r = session.last
    steps, dealt = np.array(r.step_s[1:]), np.array(r.offline_step_s[1:len(r.step_s)])
    taken_out = dealt.sum() if spec is not None and offline_first else 0.0  # a pass's offline phase, done first
    return {"ids": got, "hops": r.online_hops, "s": float(steps.sum() - taken_out),
            "passes": len(r.drafted), "drafted": sum(r.drafted), "accepted": sum(r.accepted)}


async def bench_speculate(model: str = "smollm2", drafter: Callable[[], Drafter] | None = None, draft_tokens: int = 0,
                          rtts: Sequence[float] = (0.0, 10.0, 40.0), bandwidth_mbit: float | None = None,
                          tokens: int = 32, per_kind: int = 2, kinds: Sequence[str] = tuple(PROMPTS),
                          transport: str = "memory",
                          config: ShareConfig | None = None,
                          progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Plain decoding vs speculative decoding (``drafter()`` per prompt, ``draft_tokens`` a pass or 0 for
    :class:`~.speculate.CostAwareK`) on the first ``per_kind`` prompts of each of ``kinds`` (:data:`PROMPTS`), up to
    ``tokens`` new tokens each, at each RTT in ``rtts`` (ms; ``bandwidth_mbit`` per link, None: unlimited).
    ``progress`` gets each row as it is measured."""
    from .. import local
    from ..model import load_model
    from .speculate import PromptLookup

    if not kinds or set(kinds) - set(PROMPTS):
        raise ValueError(f"kinds of prompt: some of {', '.join(PROMPTS)}, got {', '.join(kinds) or 'none'}")
    drafter = drafter or PromptLookup
    lm = await asyncio.to_thread(load_model, model)
    prompts = {k: [encode_prompt(lm.tokenizer, t) for t in PROMPTS[k][:per_kind]] for k in kinds}
    eos = {int(t) for t in lm.arch.eos_ids}
    ref = {k: await asyncio.to_thread(_greedy, model, v, tokens, eos) for k, v in prompts.items()}
    rows: list[dict[str, Any]] = []
    name = ""  # the drafter's class
    session = await local(lm, transport=transport, config=config)
    async with session:
        trio = session.trio
        assert trio is not None
        prefill = {k: [] for k in prompts}  # type: dict[str, list[int]]
        for kind, ps in prompts.items():  # each prompt's prefill hops (the same at every RTT)
            for ids in ps:
                [t async for t in session.generate_ids(ids, 1, offline_first=True)]
                prefill[kind].append(session.last.online_hops)
        for rtt in rtts:
            trio.emulate(LinkEmulator.from_spec(rtt, bandwidth_mbit) if rtt or bandwidth_mbit else None)
            for kind, ps in prompts.items():
                t0 = time.perf_counter()
                runs = {"decode": [], "speculate": []}  # type: dict[str, list[dict[str, Any]]]
                for ids, hops0, want in zip(ps, prefill[kind], ref[kind]):
                    for mode in runs:
                        got = {}
                        drafts = drafter() if mode == "speculate" else None
                        name = type(drafts).__name__ if drafts is not None else name
                        for first in (True, False):  # online alone, then as a user waits (wall)
                            spec = None if drafts is None else session.speculator(drafts, draft_tokens)
                            got[first] = await _run(session, ids, tokens, spec, first)
                        r = dict(got[True], wall_s=got[False]["s"])
                        r["same"] = r.pop("ids") == want == got[False]["ids"]
                        r["hops"] -= hops0
                        runs[mode].append(r)
                n = sum(len(w) - 1 for w in ref[kind])
                row: dict[str, Any] = {"rtt_ms": rtt, "bandwidth_mbit": bandwidth_mbit, "kind": kind,
                                       "prompts": len(ps), "tokens": n, "bench_s": time.perf_counter() - t0}
                for mode, rs in runs.items():
                    tot = {k: sum(r[k] for r in rs) for k in ("hops", "s", "wall_s", "passes", "drafted", "accepted")}
                    row[mode] = {"hops_per_token": tot["hops"] / n, "online_s_per_token": tot["s"] / n,
                                 "wall_s_per_token": tot["wall_s"] / n, "tokens_per_s": n / tot["s"],
                                 "wall_tokens_per_s": n / tot["wall_s"], "ids_identical": all(r["same"] for r in rs)}
                    if mode == "speculate":
                        row[mode].update(passes=tot["passes"], drafted=tot["drafted"], accepted=tot["accepted"])
                d, s = row["decode"], row["speculate"]
                row["hops_ratio"] = s["hops_per_token"] / d["hops_per_token"]
                row["online_ratio"] = s["online_s_per_token"] / d["online_s_per_token"]
                row["wall_ratio"] = s["wall_s_per_token"] / d["wall_s_per_token"]
                rows.append(row)
                if progress is not None:
                    progress(row)
    return {"target": model, "drafter": name, "draft_tokens": draft_tokens or "auto",
            "route": session._user.p.config.attention_route, "max_new_tokens": tokens, "rows": rows}


def format_speculate(r: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per RTT and kind of prompt."""
    lines = [f"{r['target']}, route {r['route']}, {r['drafter']} with K = {r['draft_tokens']}, up to "
             f"{r['max_new_tokens']} new tokens a prompt; per generated token after the first: online hops, online "
             "seconds (offline phase done ahead or taken out), wall seconds (as a user waits: decoding's offline "
             "phase runs ahead, a pass's alongside it)", "",
             "| RTT ms | prompts | tokens | hops: decode | speculate | ratio | online s: decode | speculate | ratio | "
             "wall s: decode | speculate | ratio | passes | accepted / drafted | ids = greedy |",
             "|" + "---|" * 15]
    for row in r["rows"]:
        d, s = row["decode"], row["speculate"]
        same = "yes" if d["ids_identical"] and s["ids_identical"] else "**no**"
        lines.append(f"| {row['rtt_ms']:g} | {row['kind']} ({row['prompts']}) | {row['tokens']} | "
                     f"{d['hops_per_token']:.0f} | {s['hops_per_token']:.0f} | {row['hops_ratio']:.2f} | "
                     f"{d['online_s_per_token']:.3f} | {s['online_s_per_token']:.3f} | {row['online_ratio']:.2f} | "
                     f"{d['wall_s_per_token']:.3f} | {s['wall_s_per_token']:.3f} | {row['wall_ratio']:.2f} | "
                     f"{s['passes']} | {s['accepted']} / {s['drafted']} | {same} |")
    return "\n".join(lines)
