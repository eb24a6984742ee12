"""One long prompt on SmolLM2, embedded, in this (fresh) process: time to first token as a user sees it
(request to token, the offline phase windowed and paced), the first two ids against transformers' greedy,
and the process's peak memory (VmHWM, MB of 10⁶ bytes) after setup and at the end.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/long_prompt.py 2048      # one JSON line

The scaling bench (``permllm bench smollm2 --prompt-len 64,256,1024,2048``) measures the same per length
and per party, in fresh processes each; this is its embedded column alone, for one length.
"""
from __future__ import annotations

import asyncio
import gc
import json
import sys
import time

import numpy as np


async def main(length: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import permllm
    from permllm.model import load_model
    from permllm.model.loaders import model_dir
    from permllm.runtime.bench import TTFT_REPS, prompt_ids
    from permllm.runtime.scaling import peak_rss_mb

    lm = load_model("smollm2")
    ids = prompt_ids(lm.tokenizer, lm.arch.vocab, length)
    hf = AutoModelForCausalLM.from_pretrained(model_dir("smollm2"), dtype=torch.float32).eval()
    with torch.no_grad():
        hf(torch.tensor([ids[:16]]))  # warm-up
        times = []
        for _ in range(TTFT_REPS):
            t0 = time.perf_counter()
            hf(torch.tensor([ids]), use_cache=True)
            times.append(time.perf_counter() - t0)
        plain = hf.generate(torch.tensor([ids]), max_new_tokens=2, do_sample=False,
                            attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):].tolist()
    del hf
    gc.collect()
    async with await permllm.local(lm) as s:
        setup_peak = peak_rss_mb()
        got: list[int] = []
        t0 = time.perf_counter()
        async for t in s.generate_ids(ids, 2, stop_at_eos=False):
            got.append(t)
            if len(got) == 1:
                ttft = time.perf_counter() - t0
        r = s.last
    return {"prompt_len": length, "ttft_s": ttft, "plaintext_ttft_s": float(np.median(times)), "ids": got,
            "plaintext_ids": plain, "identical": got == plain, "peak_rss_after_setup_mb": setup_peak,
            "peak_rss_mb": peak_rss_mb(), "online_bytes": r.online_bytes, "offline_bytes": r.offline_bytes}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2048))))
