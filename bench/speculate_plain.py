"""How many verify passes speculative decoding needs, in plaintext, on SmolLM2-135M-Instruct (issue 15).

The private model verifies K drafts in one multi-token pass; what the drafter buys is measured here
without the protocol: SmolLM2 in transformers (float32, greedy, up to ``--tokens`` new tokens, stopping
at its end id) verifies the drafts of prompt lookup (``PromptLookup``) and of a draft model
(``DraftModel`` with SmolLM2 itself: a trivially perfect drafter, the sanity check) for K in {2, 4, 8}
and the adaptive K, on copying/extraction prompts and on open questions. Every run must give plain
greedy's ids (the ``ids`` column). Usage:

    HF_HUB_OFFLINE=1 .venv/bin/python bench/speculate_plain.py [--tokens 64] [--json] [--threads 1]

Columns per kind of prompt (totals over its prompts): verify passes per generated token (the prefill
counts as one); rows per token, the positions verified (Σ K + 1: what the private passes compute and
send); hops per token on the 8-hop route, one decode step's 8·L + 8 hops (248 for SmolLM2) per pass; and
the same if a pass with drafts takes the 12-hop route (12·L + 8 = 368; the private prefill does today)
while a pass without drafts stays an 8-hop decode step.
"""
from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from permllm.model.loaders import smollm2_dir  # noqa: E402
from permllm.runtime.api import encode_prompt  # noqa: E402
from permllm.runtime.spec_bench import PROMPTS  # noqa: E402
from permllm.runtime.speculate import (AdaptiveK, Drafter, DraftModel, GreedyVerifier, PromptLookup,  # noqa: E402
                                       Speculator, speculative_generate)

POLICIES = {"2": lambda: AdaptiveK.fixed(2), "4": lambda: AdaptiveK.fixed(4), "8": lambda: AdaptiveK.fixed(8),
            "adaptive": lambda: AdaptiveK(k_max=8)}


def hops_per_pass(layers: int, per_layer: int) -> int:
    """Dependent online hops of one private step: per layer, plus the edges (final norm 2, selection 3,
    embedding 3)."""
    return per_layer * layers + 8


def run(verify: GreedyVerifier, drafter: Drafter, policy: AdaptiveK, prompt: list[int], tokens: int,
        eos: list[int]) -> dict:
    """One speculative generation: its ids, passes, rows and passes with drafts."""
    spec = Speculator(drafter, policy, eos)
    with_drafts = 0

    def counted(context: list[int], drafts: list[int]) -> list[int]:
        nonlocal with_drafts
        with_drafts += bool(drafts)
        return verify(context, drafts)

    ids = speculative_generate(counted, spec, prompt, tokens, eos)
    s = spec.stats
    return {"ids": ids, "passes": s.passes, "rows": s.rows, "drafted": s.drafted, "accepted": s.accepted,
            "with_drafts": with_drafts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json", action="store_true", help="print the per-prompt results as JSON as well")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    eos = [int(t) for t in ([hf.generation_config.eos_token_id] if isinstance(hf.generation_config.eos_token_id, int)
                            else hf.generation_config.eos_token_id or [])]
    L = hf.config.num_hidden_layers
    h8, h12 = hops_per_pass(L, 8), hops_per_pass(L, 12)
    drafters = {"prompt lookup": PromptLookup, "draft model (SmolLM2 itself)": lambda: DraftModel(hf)}
    rows: dict[tuple[str, str], dict[str, dict[str, int]]] = {}
    detail = []
    all_equal = True
    for kind, prompts in PROMPTS.items():
        for text in prompts:
            prompt = encode_prompt(tok, text)
            greedy = run(GreedyVerifier(hf), PromptLookup(), AdaptiveK.fixed(0), prompt, args.tokens, eos)["ids"]
            detail.append({"kind": kind, "prompt": text, "greedy": tok.decode(greedy, skip_special_tokens=True)})
            for dname, make in drafters.items():
                for pname, policy in POLICIES.items():
                    r = run(GreedyVerifier(hf), make(), policy(), prompt, args.tokens, eos)
                    same = r.pop("ids") == greedy
                    all_equal &= same
                    tot = rows.setdefault((dname, pname), {}).setdefault(kind, {"tokens": 0, "same": 1})
                    tot["tokens"] += len(greedy)
                    tot["same"] &= same
                    for k, v in r.items():
                        tot[k] = tot.get(k, 0) + v
                    detail[-1][f"{dname}, K={pname}"] = dict(r, tokens=len(greedy), same=same)
    head = ("| drafter | K | " + " | ".join(f"{k}: passes/token | {k}: rows/token | {k}: hops/token | "
                                             f"{k}: hops/token, K>0 on 12" for k in PROMPTS) + " | ids = greedy |")
    made = {k: next(iter(rows.values()))[k]["tokens"] for k in PROMPTS}
    print(f"SmolLM2-135M-Instruct, greedy, up to {args.tokens} new tokens; {len(PROMPTS['copy'])} copying/extraction "
          f"prompts ({made['copy']} tokens), {len(PROMPTS['open'])} open questions ({made['open']} tokens); {h8} hops "
          f"a pass on the 8-hop route, {h12} on the 12-hop\n")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    base = " | ".join(f"1.00 | 1.00 | {h8} | {h8}" for _ in PROMPTS)
    print(f"| none (decode) | 0 | {base} | yes |")
    for (dname, pname), kinds in rows.items():
        cells = []
        for k in PROMPTS:
            t = kinds[k]
            n = t["tokens"]
            hops12 = (t["with_drafts"] * h12 + (t["passes"] - t["with_drafts"]) * h8) / n
            cells.append(f"{t['passes'] / n:.2f} | {t['rows'] / n:.2f} | {h8 * t['passes'] / n:.0f} | {hops12:.0f}")
        same = "yes" if all(kinds[k]["same"] for k in PROMPTS) else "no"
        print(f"| {dname} | {pname} | {' | '.join(cells)} | {same} |")
    if args.json:
        print(json.dumps(detail, indent=1))
    if not all_equal:
        raise SystemExit("a speculative run did not give greedy's ids")


if __name__ == "__main__":
    main()
