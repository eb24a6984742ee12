"""The light client (``--offline he``) against the dealt mode on SmolLM2-135M-Instruct, in one run.

For each mode it starts a helper daemon and a model-party daemon (loopback TCP,
``--insecure``) and runs the user party in a process of its own (``permllm.connect``,
which loads only the tokenizer), generating greedily from "What is the capital of
France?" (chat template). Both modes' processes run at once and take turns: each user
process first runs one generation (the dealt mode's, then the light mode's) and reports

* its peak RSS (``ru_maxrss``), after the setup and after that generation (and, at the
  end, after the offline-first generations below, which hold a whole generation's
  offline state at once);
* the bytes it received in the setup phase;
* offline seconds per token (its offline phase, wall time, over the generated tokens);
* online seconds per token: the online steps' own time, over the generated tokens
  (the prefill step included). The dealt mode runs the offline phase ahead of the
  online one in a window, so its online steps share the CPU with offline work.

Then the fair comparison of the online phases: :data:`ROUNDS` generations of each mode
with the offline phase done first; each mode runs its offline phase and prefill while the
other waits, then their decode steps alternate, one step of one mode, one of the other,
so that this shared machine's slow spells (they last seconds to minutes and can slow
every step by 2×) fall on both modes alike. Each paced step starts ``--pause`` seconds
(default :data:`PAUSE`) after the previous one ended: after its step a model daemon's
OpenBLAS threads spin (~100 ms of CPU in the next 0.3 s, in both modes), and on a two-core
machine they took a core from the *other* mode's next step (a deployment runs one mode's
daemons, not two). The bench reads every process's CPU time (``/proc``) around each paced
step and prints the median per process, its own mode's and the other's: ``--pause 0``
shows the effect. The target compares the median decode step; the lower quartile and the
mean with the prefill are printed too;

and the token ids, compared here with transformers' greedy ids (float32, same run).
``--precision`` also measures the CKKS products on SmolLM2's own weights and mask
sizes (one op of each kind) against float64. Usage:

    .venv/bin/python bench/light_client.py [--tokens 32] [--pause 0.3] [--precision] [--json]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

FRANCE = "What is the capital of France?"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


MARK = "@permllm-bench "  # prefixes the user process's report lines on its stdout


def _report(obj: object) -> None:
    print(MARK + json.dumps(obj), flush=True)


async def _user(model_party: str, helper: str, offline: str, tokens: int) -> None:
    """The user process: on "first", connect and run one generation (peak RSS, setup bytes, offline
    cost); on each "again", one more with the offline phase done first (its online step times)."""
    import resource

    import permllm
    from permllm.runtime.config import load_config

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    async def command() -> str:
        return (await asyncio.to_thread(sys.stdin.readline)).strip()

    if await command() != "first":
        return
    settings = load_config("user", overrides={"insecure": True, "limits.message_timeout": 3600.0})
    t0 = time.perf_counter()
    session = await permllm.connect(model_party, helper, settings=settings, offline=offline)
    out: dict = {"mode": offline, "setup_s": time.perf_counter() - t0, "rss_setup_mb": rss_mb(),
                 "setup_bytes_recv": session._meters[0].total("setup").bytes_recv, "torch": "torch" in sys.modules}
    meter = session._meters[0]
    async with session:
        ids = session.encode(FRANCE)
        off0 = meter.total("offline")
        got = [t async for t in session.generate_ids(ids, tokens, stop_at_eos=False)]
        r, off = session.last, meter.total("offline")
        n = len(got)
        out.update(prompt_ids=ids, token_ids=got, text=session.tokenizer.decode(got, skip_special_tokens=True),
                   rss_mb=rss_mb(), offline_s_per_token=r.offline_s / n, online_s_per_token=sum(r.step_s) / n,
                   prefill_s=r.step_s[0], decode_s_per_token=sum(r.step_s[1:]) / max(n - 1, 1),
                   offline_sent=off.bytes_sent - off0.bytes_sent, offline_recv=off.bytes_recv - off0.bytes_recv,
                   online_bytes=r.online_bytes)
        _report(out)
        while await command() == "again":
            again = []
            async for t in session.generate_ids(ids, tokens, stop_at_eos=False, offline_first=True):
                again.append(t)
                _report({"tokens": len(again)})
                if await command() != "next":  # paced by the driver: one online step per "next"
                    return
            _report({"step_s": list(session.last.step_s), "same_ids": again == got, "rss_mb": rss_mb()})


def _start(args: list[str]) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-m", "permllm.cli", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, env=ENV)
    line = p.stdout.readline() if p.stdout else ""
    m = re.search(r"listening on (\S+:\d+)", line)
    if not m:
        p.kill()
        raise RuntimeError(f"daemon did not start: {line!r}")
    return p, m.group(1)


class Mode:
    """One mode's helper and model-party daemons (loopback TCP, ``--insecure``) and its user process."""

    def __init__(self, offline: str, tokens: int) -> None:
        self.offline = offline
        self.procs: list[subprocess.Popen] = []
        flags = ["--insecure", "--listen", "127.0.0.1:0", "--offline", offline, "--message-timeout", "3600"]
        try:
            helper, h_addr = _start(["serve", "helper", *flags])
            self.procs.append(helper)
            model, m_addr = _start(["serve", "model", *flags, "--helper", h_addr])
            self.procs.append(model)
            self.user = subprocess.Popen([sys.executable, __file__, "--user", m_addr, h_addr, "--offline", offline,
                                          "--tokens", str(tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, env=ENV)
            self.procs.insert(0, self.user)
        except BaseException:
            self.close()
            raise

    def ask(self, command: str) -> dict:
        """Send the user process a command; its report."""
        assert self.user.stdin is not None and self.user.stdout is not None
        self.user.stdin.write(command + "\n")
        self.user.stdin.flush()
        for line in self.user.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
        raise RuntimeError(f"the {self.offline} user process ended (exit status {self.user.wait()})")

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds used so far by the user process, the helper and the model party (with its
        HE worker processes), from /proc; empty where /proc is missing."""
        user, helper, model = (p.pid for p in self.procs)
        try:
            return {"U": _cpu_s(user), "H": _cpu_s(helper),
                    "M": _cpu_s(model) + sum(_cpu_s(c) for c in _children(model))}
        except OSError:
            return {}

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (its threads included)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


ROUNDS = 2  # paced generations of each mode with the offline phase done first
PAUSE = 0.3  # seconds between paced steps: the previous step's daemons are idle again (module docstring)


def run_modes(tokens: int, pause: float = PAUSE) -> dict:
    """Both modes' daemons and user processes at once: first generations in turn, then ROUNDS
    offline-first generations of both, whose decode steps alternate between the two modes,
    ``pause`` seconds apart; the CPU each process used during each decode step."""
    modes: dict[str, Mode] = {}
    try:
        for m in ("dealer", "he"):
            modes[m] = Mode(m, tokens)
        res = {m: modes[m].ask("first") for m in modes}
        for _ in range(ROUNDS):
            # Each runs its offline phase and prefill while the other waits (the light one first:
            # its offline phase is the long one), then one decode step each in turn.
            for m in ("he", "dealer"):
                modes[m].ask("again")
            for i in range(1, tokens + 1):  # the last "next" ends the generations: their reports
                for m in (("dealer", "he") if i % 2 else ("he", "dealer")):
                    time.sleep(pause)
                    before = {k: mode.cpu_s() for k, mode in modes.items()}
                    rep = modes[m].ask("next")
                    if i < tokens:  # a decode step (the last "next" only ends the generation)
                        for k, mode in modes.items():
                            used = {p: (t - before[k][p]) * 1e3 for p, t in mode.cpu_s().items() if p in before[k]}
                            key = "cpu_ms_own_steps" if k == m else "cpu_ms_other_steps"
                            for p, ms in used.items():
                                res[k].setdefault(key, {}).setdefault(p, []).append(ms)
                    if i == tokens:
                        res[m].setdefault("online_steps_offline_first", []).append(rep["step_s"])
                        res[m].setdefault("again_same_ids", []).append(rep["same_ids"])
                        res[m]["rss_end_mb"] = rep["rss_mb"]
        return res
    finally:
        for mode in modes.values():
            mode.close()


def precision() -> list[dict]:
    """CKKS products on SmolLM2's weights: max |error| of x_U·W − r against float64, one op of each kind."""
    import numpy as np

    from permllm.model import calibrate, load_model
    from permllm.protocols import DEFAULT_RATIO, he_matmul as H

    lm = load_model("smollm2")
    w, mags = lm.weights, asyncio.run(calibrate(lm.weights))
    st_u, msg = H._user_keys()
    st_m = H._model_keys(msg)
    rng = np.random.default_rng(0)
    R = DEFAULT_RATIO

    def col(name: str, n: int) -> np.ndarray:
        v = mags.get(name + "|col")
        return np.asarray(v) if v is not None and np.shape(v) == (n,) else np.full(n, mags[name])

    rows = []
    # (op, weight, its input's magnitude, kind, rows): prefill-sized batches, the worst MLP, the head
    cases = [("L0.qkv", "L0.qkv", "L0.n1", "dense", 37), ("L0.o", "L0.o", "L0.attm", "dense", 37),
             ("L0.mlp_in", "L0.mlp_in", "L0.n2", "dense", 37), ("L28.mlp_out", "L28.mlp_out", "L28.act", "dense", 37),
             ("embed", "embed", None, "transposed", 37), ("final", "final", "final.n", "diag", 8),
             ("logits", "embed", "final", "dense", 8)]
    for op, weight, src, kind, n in cases:
        W = np.asarray(w[weight], dtype=np.float64)
        Weff = W.T if kind == "transposed" else W
        n_out = Weff.shape[0]
        n_in = n_out if kind == "diag" else Weff.shape[1]
        mag_in = 1.0 if src is None else float(mags[src])
        X = (rng.integers(-int(R) // 2, int(R) // 2, size=(n, n_in)).astype(float) if src is None
             else (rng.random((n, n_in)) - 0.5) * R * col(src, n_in))
        mag_out = float(np.max(mags.get(op + "|col", mags[op])))
        r = (rng.random((n, n_out)) - 0.5) * R * mag_out
        L = H.plan(n_in, n_out, n, kind == "diag")
        xb, wb = H.scales(R, mag_in, float(np.max(np.abs(W))), n_in, mag_out, kind == "diag")
        t0 = time.perf_counter()
        blobs, masks = H.model_product(st_m, Weff, L, H.user_encrypt(st_u, X, L, xb), xb, wb, 1)
        m_s = time.perf_counter() - t0
        got = H.model_unmask(st_m, H.user_unmask(st_u, blobs, H.pack_out(r, L), 0, len(blobs)), masks, L,
                             2.0 ** (xb + wb))
        want = (X * Weff if kind == "diag" else X @ Weff.T) - r
        err = float(np.max(np.abs(got - want)))
        rows.append({"op": op, "rows": n, "n_in": n_in, "n_out": n_out, "K": L.K, "scale_bits": [xb, wb],
                     "max_abs_err": err, "mag_out": mag_out, "rel_err": err / mag_out, "model_s": m_s})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--pause", type=float, default=PAUSE, help="seconds between the paced decode steps")
    ap.add_argument("--precision", action="store_true")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--save", metavar="FILE", help="also write the JSON report to FILE")
    ap.add_argument("--user", nargs=2, metavar=("MODEL_PARTY", "HELPER"), help=argparse.SUPPRESS)
    ap.add_argument("--offline", default="he", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.pause < 0:
        ap.error("--pause must be at least 0")
    if a.user:
        asyncio.run(_user(*a.user, a.offline, a.tokens))
        return
    res = run_modes(a.tokens, a.pause)
    import torch
    from transformers import AutoModelForCausalLM

    from permllm.model.loaders import smollm2_dir
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32).eval()
    prompt = res["he"]["prompt_ids"]
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), max_new_tokens=a.tokens, do_sample=False, eos_token_id=None,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    for r in res.values():
        r["identical"] = r["token_ids"] == want and all(r["again_same_ids"])
        steps = [s for run in r["online_steps_offline_first"] for s in run]
        decode = [s for run in r["online_steps_offline_first"] for s in run[1:]]
        r["online_s_per_token_offline_first"] = sum(steps) / len(steps)
        r["decode_s_median_offline_first"] = float(np.median(decode))
        r["decode_s_p25_offline_first"] = float(np.percentile(decode, 25))
    report = {"tokens": a.tokens, "pause_s": a.pause, "prompt_tokens": len(prompt), "modes": res}
    if a.precision:
        report["precision"] = precision()
    if a.save:
        with open(a.save, "w") as f:
            json.dump(report, f, indent=1)
    if a.json:
        print(json.dumps(report, indent=1))
        return
    d, h = res["dealer"], res["he"]
    print(f"SmolLM2-135M-Instruct, {len(prompt)}-token prompt, {a.tokens} greedy tokens; user in its own process\n")
    print("| | dealt (standard) | light (`--offline he`) | light / dealt |")
    print("|---|---|---|---|")
    print(f"| user peak RSS | {d['rss_mb']:.0f} MB | {h['rss_mb']:.0f} MB | {h['rss_mb'] / d['rss_mb']:.0%} |")
    print(f"| user peak RSS after the offline-first generations too | {d['rss_end_mb']:.0f} MB | "
          f"{h['rss_end_mb']:.0f} MB | {h['rss_end_mb'] / d['rss_end_mb']:.0%} |")
    print(f"| bytes the user receives in setup | {d['setup_bytes_recv'] / 1e6:.1f} MB | "
          f"{h['setup_bytes_recv'] / 1e6:.3f} MB | {h['setup_bytes_recv'] / d['setup_bytes_recv']:.2%} |")
    print(f"| offline s/token | {d['offline_s_per_token']:.2f} | {h['offline_s_per_token']:.2f} | "
          f"{h['offline_s_per_token'] / d['offline_s_per_token']:.0f}× |")
    on_d, on_h = d["online_s_per_token_offline_first"], h["online_s_per_token_offline_first"]
    med_d, med_h = d["decode_s_median_offline_first"], h["decode_s_median_offline_first"]
    q_d, q_h = d["decode_s_p25_offline_first"], h["decode_s_p25_offline_first"]
    print(f"| online s/token, median decode step (offline phase done first; {ROUNDS} generations each, "
          f"decode steps alternating between the modes, {a.pause} s apart) | {med_d:.3f} | {med_h:.3f} | "
          f"{med_h / med_d:.2f} |")
    print(f"| online s/token, lower quartile of the same decode steps | {q_d:.3f} | {q_h:.3f} | {q_h / q_d:.2f} |")
    print(f"| online s/token, mean with the prefill (same generations) | {on_d:.3f} | {on_h:.3f} | "
          f"{on_h / on_d:.2f} |")
    print(f"| online s/token (first generation: dealt offline running ahead, light in batches) | "
          f"{d['online_s_per_token']:.3f} | {h['online_s_per_token']:.3f} | |")
    print(f"| user's offline traffic per token, sent / received | {d['offline_sent'] / a.tokens / 1e6:.1f} / "
          f"{d['offline_recv'] / a.tokens / 1e6:.1f} MB | {h['offline_sent'] / a.tokens / 1e6:.1f} / "
          f"{h['offline_recv'] / a.tokens / 1e6:.1f} MB | |")
    print(f"| greedy ids identical to transformers | {d['identical']} | {h['identical']} | |")
    if d.get("cpu_ms_own_steps"):
        print("\nMedian CPU ms per decode step, by process (U user, M model party with its HE workers, H helper):")
        print("| during a step of | dealt's U / M / H | light's U / M / H |")
        print("|---|---|---|")
        for who, key_d, key_h in (("dealt", "cpu_ms_own_steps", "cpu_ms_other_steps"),
                                  ("light", "cpu_ms_other_steps", "cpu_ms_own_steps")):
            cells = [" / ".join(f"{np.median(r[key][p]):.0f}" for p in "UMH") for r, key in ((d, key_d), (h, key_h))]
            print(f"| {who} | {cells[0]} | {cells[1]} |")
    print(f"\nlight-mode text: {h['text']!r}")
    if a.precision:
        print("\n| op | rows | n_in → n_out | K | scales (x, w bits) | max abs error | relative to max |out| |")
        print("|---|---|---|---|---|---|---|")
        for p in report["precision"]:
            print(f"| {p['op']} | {p['rows']} | {p['n_in']} → {p['n_out']} | {p['K']} | 2^{p['scale_bits'][0]}, "
                  f"2^{p['scale_bits'][1]} | {p['max_abs_err']:.1e} | {p['rel_err']:.1e} |")


if __name__ == "__main__":
    main()
