"""Every figure of the README's performance table, in one run (issue 4's targets).

Runs ``permllm bench --json`` once per configuration, each in a fresh process, one
after another (the plaintext baseline is measured inside each run):

* ``chatglm6b-layer`` (one full-size ChatGLM-6B layer, prefill of 120 rows then 8 decode
  steps: context up to 128) for both attention routes and both share dtypes, without
  delay and at 10 ms RTT / 1 Gbit/s;
* ``smollm2`` (SmolLM2-135M-Instruct end to end, 64-token prompt, 16 tokens) for both
  routes in float64, and the 8-hop route in float32.

Prints a markdown table and writes the raw JSON with ``--save``. Usage:

    .venv/bin/python bench/performance.py [--save perf.json] [--quick]

``--quick`` runs fewer decode steps (a smoke test of the script, not the README's figures).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
LINK = ["--rtt", "10", "--bandwidth", "1000"]


def run(args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "permllm.cli", "bench", "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["command"] = "permllm bench " + " ".join(args)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--save", metavar="FILE")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    glm = ["chatglm6b-layer", "--prompt-len", "120", "--tokens", "2" if a.quick else "8"]
    smol = ["smollm2", "--prompt-len", "64", "--tokens", "3" if a.quick else "16"]
    res: dict[str, dict] = {}
    for dtype in ("float64", "float32"):
        for route in ("12", "8"):
            res[f"glm {dtype} r{route}"] = run([*glm, "--dtype", dtype, "--route", route])
            res[f"glm {dtype} r{route} rtt"] = run([*glm, "--dtype", dtype, "--route", route, *LINK])
    for dtype, route in (("float64", "12"), ("float64", "8"), ("float32", "8")):
        res[f"smol {dtype} r{route}"] = run([*smol, "--dtype", dtype, "--route", route])
    if a.save:
        with open(a.save, "w") as f:
            json.dump(res, f, indent=1)

    def ms(r: dict, k: str) -> str:
        return f"{r[k]:.0f}"

    print("| figure | configuration | private | plaintext | ratio / difference |")
    print("|---|---|---|---|---|")
    for dtype in ("float64", "float32"):
        for route in ("12", "8"):
            r, q = res[f"glm {dtype} r{route}"], res[f"glm {dtype} r{route} rtt"]
            cfg = f"{dtype}, {route}-hop"
            print(f"| ChatGLM-6B layer decode, no delay (ms) | {cfg} | {ms(r, 'online_ms_per_token')} | "
                  f"{ms(r, 'plaintext_ms_per_token')} | {r['online_ms_per_token'] / r['plaintext_ms_per_token']:.2f}× |")
            print(f"| ChatGLM-6B layer decode, 10 ms RTT, 1 Gbit/s (ms) | {cfg} | {ms(q, 'online_ms_per_token')} | "
                  f"{ms(q, 'plaintext_ms_per_token')} | "
                  f"+{q['online_ms_per_token'] - q['plaintext_ms_per_token']:.0f} ms |")
            print(f"| ChatGLM-6B layer: hops / offline per decode step (ms) | {cfg} | {r['hops_per_layer']:.0f} hops, "
                  f"offline {ms(r, 'offline_ms_per_token')} | | offline {r['offline_ms_per_token'] / r['online_ms_per_token']:.2f}× online |")
            print(f"| online traffic per token, ChatGLM-6B shape (28 layers, context ≤ 128) | {cfg} | "
                  f"{r['online_bytes_per_token'] / 1e6:.1f} MB | | of which selection + embedding "
                  f"{r['selection_online_bytes'] / 1e6:.2f} MB |")
    for dtype, route in (("float64", "12"), ("float64", "8"), ("float32", "8")):
        r = res[f"smol {dtype} r{route}"]
        cfg = f"{dtype}, {route}-hop"
        print(f"| SmolLM2 decode per token (ms) | {cfg} | {ms(r, 'online_ms_per_token')} | "
              f"{ms(r, 'plaintext_ms_per_token')} | {r['online_ms_per_token'] / r['plaintext_ms_per_token']:.2f}× |")
        print(f"| SmolLM2 time to first token, 64-token prompt (ms) | {cfg} | {ms(r, 'ttft_ms')} | "
              f"{ms(r, 'plaintext_ttft_ms')} | {r['ttft_ms'] / r['plaintext_ttft_ms']:.2f}× |")
        print(f"| SmolLM2 offline per decode step (ms), hops per token | {cfg} | {ms(r, 'offline_ms_per_token')}, "
              f"{r['hops_per_token']:.0f} hops | | offline {r['offline_ms_per_token'] / r['online_ms_per_token']:.2f}× "
              f"online |")
        print(f"| SmolLM2 traffic per token, online / offline | {cfg} | {r['online_bytes_per_token'] / 1e6:.2f} / "
              f"{r['offline_bytes_per_token'] / 1e6:.1f} MB | | greedy ids identical: {r['greedy_identical']} |")


if __name__ == "__main__":
    main()
