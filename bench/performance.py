"""Every figure of the README's performance table, in one run (issue 4's targets).

Runs ``permllm bench --json`` once per configuration, each in a fresh process, one
after another (the plaintext baseline is measured inside each run):

* ``chatglm6b-layer`` (one full-size ChatGLM-6B layer, prefill of 120 rows then 8 decode
  steps: context up to 128) for each configuration of :data:`CONFIGS` (share dtype and
  attention route), without delay and at 10 ms RTT / 1 Gbit/s;
* ``smollm2`` (SmolLM2-135M-Instruct end to end, 64-token prompt, 16 tokens) for each
  configuration.

float32 shares are no longer a configuration: they are refused (their R = 2**4 masks
do not hide the inputs; README, *Precision and hiding*).

Prints the README's markdown table and writes the raw JSON with ``--save`` (``--load``
prints the table of a saved run). Usage:

    .venv/bin/python bench/performance.py [--save perf.json | --load perf.json] [--quick]

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
FLOAT = ["--arith", "float"]  # the table's columns are real-number shares (the ring is the default now)


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
    ap.add_argument("--load", metavar="FILE")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.load:
        with open(a.load) as f:
            print(table(json.load(f)))
        return
    glm = ["chatglm6b-layer", "--prompt-len", "120", "--tokens", "2" if a.quick else "8"]
    smol = ["smollm2", "--prompt-len", "64", "--tokens", "3" if a.quick else "16"]
    res: dict[str, dict] = {}
    for dtype, route in CONFIGS:
        res[f"glm {dtype} r{route}"] = run([*glm, *FLOAT, "--dtype", dtype, "--route", route])
        res[f"glm {dtype} r{route} rtt"] = run([*glm, *FLOAT, "--dtype", dtype, "--route", route, *LINK])
    for dtype, route in CONFIGS:
        res[f"smol {dtype} r{route}"] = run([*smol, *FLOAT, "--dtype", dtype, "--route", route])
    if a.save:
        with open(a.save, "w") as f:
            json.dump(res, f, indent=1)

    print(table(res))


CONFIGS = [("float64", "12"), ("float64", "8")]


def table(res: dict[str, dict]) -> str:
    """The README's table: one column per (dtype, route), the reference and the target."""
    def row(figure: str, cell, ref: str, target: str) -> str:
        return f"| {figure} | " + " | ".join(cell(d, r) for d, r in CONFIGS) + f" | {ref} | {target} |"

    def glm(fmt):
        return lambda d, r: fmt(res[f"glm {d} r{r}"], res[f"glm {d} r{r} rtt"])

    def smol(fmt):
        return lambda d, r: fmt(res[f"smol {d} r{r}"])

    head = "| figure | " + " | ".join(f"{d}, {r}-hop" for d, r in CONFIGS) + " | reference | target |"
    rows = [head, "|---" * (len(CONFIGS) + 3) + "|",
            row("hops per decoder layer (decode)", glm(lambda r, q: f"{r['hops_per_layer']:.0f}"), "12", "≤ 8"),
            row("ChatGLM-6B layer decode, no delay: online / plaintext (same dtype)",
                glm(lambda r, q: f"{r['online_ms_per_token']:.0f} / {r['plaintext_ms_per_token']:.0f} ms = "
                                 f"{r['online_ms_per_token'] / r['plaintext_ms_per_token']:.2f}×"),
                "90 / 55 ms = 1.6× (float32)", "≤ 1.3×"),
            row("ChatGLM-6B layer decode, 10 ms RTT, 1 Gbit/s: online − plaintext",
                glm(lambda r, q: f"{q['online_ms_per_token']:.0f} − {q['plaintext_ms_per_token']:.0f} = "
                                 f"+{q['online_ms_per_token'] - q['plaintext_ms_per_token']:.0f} ms"), "—", "≤ +45 ms"),
            row("ChatGLM-6B layer: offline / online per decode step",
                glm(lambda r, q: f"{r['offline_ms_per_token']:.0f} / {r['online_ms_per_token']:.0f} ms = "
                                 f"{r['offline_ms_per_token'] / r['online_ms_per_token']:.1f}×"), "—", "≤ 3×"),
            row("online traffic per token, ChatGLM-6B shape (28 layers, context ≤ 128)",
                glm(lambda r, q: f"{r['online_bytes_per_token'] / 1e6:.1f} MB"), "18.9 MB (float32)", "≤ 10 MB"),
            row("… of which a token's edges (embedding, final norm, token selection)",
                glm(lambda r, q: f"{sum(r['online_bytes_edges'].values()) / 1e6:.2f} MB"), "≈ 4 MB", "—"),
            row("SmolLM2 decode: online / plaintext per token",
                smol(lambda r: f"{r['online_ms_per_token']:.0f} / {r['plaintext_ms_per_token']:.0f} ms = "
                               f"{r['online_ms_per_token'] / r['plaintext_ms_per_token']:.1f}×"), "—", "≤ 3×"),
            row("SmolLM2 time to first token, 64-token prompt (median of 3)",
                smol(lambda r: f"{r['ttft_ms']:.0f} / {r['plaintext_ttft_ms']:.0f} ms = "
                               f"{r['ttft_ms'] / r['plaintext_ttft_ms']:.1f}×"), "—", "≤ 3×"),
            row("SmolLM2: offline / online per decode step",
                smol(lambda r: f"{r['offline_ms_per_token']:.0f} / {r['online_ms_per_token']:.0f} ms = "
                               f"{r['offline_ms_per_token'] / r['online_ms_per_token']:.1f}×"), "—", "≤ 3×"),
            row("SmolLM2 hops per token (30 layers)", smol(lambda r: f"{r['hops_per_token']:.0f}"), "—",
                "≤ 8·L + 8 = 248"),
            row("SmolLM2 traffic per token: online / offline",
                smol(lambda r: f"{r['online_bytes_per_token'] / 1e6:.2f} / {r['offline_bytes_per_token'] / 1e6:.1f} MB"),
                "—", "—"),
            row("SmolLM2 greedy ids identical to transformers (16 tokens)",
                smol(lambda r: "yes" if r["greedy_identical"] else "**no**"), "—", "identical"),
            row("ChatGLM-6B layer: max abs error of the prefill output",
                glm(lambda r, q: f"{r['prefill_max_abs_err']:.0e}"), "≈ 1e-3 (float32)", "—")]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
