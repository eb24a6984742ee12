"""The scaling bench behind ``permllm bench smollm2 --prompt-len 64,256,1024,2048``.

Per prompt length, every measurement runs in fresh processes, so that each peak is that length's:

* ``plaintext``: transformers' prefill of the prompt (time to first token: the median of
  :data:`~permllm.runtime.bench.TTFT_REPS` prefills after a warm-up, as ``permllm bench``) and its
  greedy first token;
* ``embedded``: the three parties in one process (:func:`permllm.local`): the private time to first
  token as a user sees it (request to token, the offline phase running ahead of the online one as in
  real use; after a warm-up on 16 tokens; the median of the reps, one rep past :data:`LONG` tokens),
  the prefill's online bytes (all parties), the first token and the process's peak memory;
* ``parties``: the deployment, ``permllm serve`` daemons for M and H (plain TCP on loopback) and a
  user process that connects to them and runs one prefill: each process's peak memory, the first
  token and that prefill's time.

The prompt of length L is the bench's :data:`~permllm.runtime.bench.TEXT` repeated, tokenized and
cut to L tokens, so all lengths share a prefix. Peak memory is the kernel's VmHWM of the process
(``/proc/PID/status``), its own resident high-water mark since it started: ``ru_maxrss`` is not
used, as Linux carries the forking parent's peak into a child's at ``exec``. A stage that fails (a
nonzero exit, a kill by the out-of-memory killer, a timeout) is reported under its length's
``errors`` and the run goes on with the next stage and length.

``python -m permllm.runtime.scaling STAGE SPEC`` runs one stage (``plaintext``, ``embedded`` or
``user``; SPEC is a JSON object) and prints its result as one JSON line: the bench's subprocesses.
"""
from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
import re
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..protocols import ShareConfig
from .bench import TTFT_REPS, prompt_ids

__all__ = ["bench_scaling", "format_scaling", "plot_scaling", "peak_rss_mb", "PARTIES"]

PARTIES = ("model", "user", "helper", "embedded", "plaintext")  # the processes whose peak memory is reported
READY_TIMEOUT_S = 600.0  # a daemon loads its model before it listens
LONG = 256  # prompts longer than this are timed once (a 2,048-token prefill takes minutes here)


def peak_rss_mb(pid: int | str = "self") -> float:
    """The peak resident memory (VmHWM) of a running process, in MB (10⁶ bytes)."""
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"^VmHWM:\s+(\d+) kB", text, re.M)
    if m is None:
        raise OSError(f"no VmHWM in /proc/{pid}/status")
    return int(m.group(1)) * 1024 / 1e6


def _tokenizer(model: str) -> Any | None:
    """The model's tokenizer, or None for a model without one (its prompt is then TEXT's bytes)."""
    from ..model import ModelFileError
    from ..model.loaders import load_tokenizer

    try:
        return load_tokenizer(model)
    except ModelFileError:
        return None


def _stage_plaintext(spec: dict[str, Any]) -> dict[str, Any]:
    """transformers' prefill: the median time to first token after a warm-up, and the greedy first token."""
    import torch
    from transformers import AutoModelForCausalLM

    from ..model.loaders import model_dir

    hf = AutoModelForCausalLM.from_pretrained(model_dir(spec["model"]), dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids(_tokenizer(spec["model"]), hf.config.vocab_size, spec["length"])])
    times = []
    with torch.no_grad():
        hf(ids)  # warm-up
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            out = hf(ids, use_cache=True)
            first = int(out.logits[0, -1].argmax())
            times.append(time.perf_counter() - t0)
    return {"ttft_ms": 1e3 * float(np.median(times)), "first_token": first, "peak_rss_mb": peak_rss_mb()}


async def _stage_embedded(spec: dict[str, Any]) -> dict[str, Any]:
    """The three parties in this process: the median private time to first token after a warm-up (the wall
    time from the request to the token, the offline phase running ahead as in real use, so memory holds a
    few layers of one chunk's correlations), the prefill's online bytes and the first token."""
    from .. import local
    from ..model import load_model

    lm = await asyncio.to_thread(load_model, spec["model"])
    ids = prompt_ids(lm.tokenizer, lm.arch.vocab, spec["length"])
    times = []
    async with await local(lm, transport=spec["transport"], config=ShareConfig(**spec["config"])) as session:
        [t async for t in session.generate_ids(ids[:16], 1, stop_at_eos=False)]  # a warm-up
        for _ in range(spec["reps"]):
            t0 = time.perf_counter()
            got = [t async for t in session.generate_ids(ids, 1, stop_at_eos=False)]
            times.append(time.perf_counter() - t0)
        online_bytes = session.last.online_bytes
    return {"ttft_ms": 1e3 * float(np.median(times)), "first_token": got[0],
            "prefill_online_bytes": online_bytes, "peak_rss_mb": peak_rss_mb()}


async def _stage_user(spec: dict[str, Any]) -> dict[str, Any]:
    """The user party against the model and helper daemons: one prefill, its time and first token."""
    from .. import connect
    from .config import load_config

    tokenizer = await asyncio.to_thread(_tokenizer, spec["model"])
    session = await connect(spec["model_party"], spec["helper"], model=None, config=ShareConfig(**spec["config"]),
                            settings=load_config("user", overrides={"insecure": True}))
    async with session:
        ids = prompt_ids(tokenizer, session.arch.vocab, spec["length"])
        t0 = time.perf_counter()
        got = [t async for t in session.generate_ids(ids, 1, stop_at_eos=False)]
        ttft = time.perf_counter() - t0
    return {"ttft_ms": 1e3 * ttft, "first_token": got[0], "peak_rss_mb": peak_rss_mb()}


STAGES: dict[str, Callable[[dict[str, Any]], Any]] = {
    "plaintext": _stage_plaintext, "embedded": _stage_embedded, "user": _stage_user}


def _env() -> dict[str, str]:
    """The subprocesses' environment: offline Hugging Face, this process's import path."""
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": path}


def _failure(returncode: int, stderr: str) -> str:
    """Why a process failed, in one line: the signal that killed it, or its exit status and last error line."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}" + (" (most likely the out-of-memory killer)" if name == "SIGKILL" else "")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    return f"exit status {returncode}" + (f": {lines[-1]}" if lines else "")


def _run_stage(stage: str, spec: dict[str, Any], timeout_s: float | None) -> tuple[dict[str, Any] | None, str | None]:
    """Run one stage in a fresh process; (its result, None) or (None, why it failed)."""
    cmd = [sys.executable, "-m", "permllm.runtime.scaling", stage, json.dumps(spec)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=_env())
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:g} s"
    if p.returncode != 0:
        return None, _failure(p.returncode, p.stderr)
    try:
        return json.loads(p.stdout.strip().splitlines()[-1]), None
    except (IndexError, ValueError):
        return None, f"no result on stdout: {p.stdout[-300:]!r}"


class _Daemon:
    """A ``permllm serve`` process on loopback (plain TCP), its log in a file; ``addr`` once it listens."""

    def __init__(self, role: str, args: list[str], log: Path) -> None:
        self.role = role
        self.log = log
        with open(log, "wb") as err:
            self.p = subprocess.Popen([sys.executable, "-m", "permllm.cli", "serve", role, "--insecure",
                                       "--listen", "127.0.0.1:0", "--log-level", "WARNING", *args],
                                      stdout=subprocess.PIPE, stderr=err, text=True, env=_env())
        self.addr = ""

    def wait_ready(self, timeout_s: float) -> str | None:
        """Wait for "permllm ROLE listening on HOST:PORT"; None once it listens, else why it did not start."""
        assert self.p.stdout is not None
        ready, _, _ = select.select([self.p.stdout], [], [], timeout_s)
        line = self.p.stdout.readline() if ready else ""
        m = re.search(r"listening on (\S+:\d+)", line)
        if m:
            self.addr = m.group(1)
            return None
        if not ready:
            return f"{self.role} party did not listen within {timeout_s:g} s"
        self.p.wait(30)  # stdout closed: it has exited
        return f"{self.role} party did not start: {self.failure()}"

    def failure(self) -> str:
        """Why it ended (it must have)."""
        return _failure(self.p.returncode, self.log.read_text(errors="replace"))

    def peak(self) -> float | None:
        """Its peak memory so far, or None when it has exited."""
        try:
            return peak_rss_mb(self.p.pid) if self.p.poll() is None else None
        except OSError:
            return None

    def terminate(self) -> str | None:
        """SIGTERM (it drains and exits: :meth:`wait`); None, or why it had already ended."""
        if self.p.poll() is not None:
            return self.failure()
        self.p.send_signal(signal.SIGTERM)
        return None

    def wait(self) -> None:
        """Wait until it has exited (SIGKILL after 90 s)."""
        try:
            self.p.wait(90)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        assert self.p.stdout is not None
        self.p.stdout.close()


def _share_flags(config: ShareConfig) -> list[str]:
    """The daemons' flags for the share configuration (all three parties must agree)."""
    return ["--dtype", config.dtype, "--ratio", repr(config.ratio), "--route", config.route, "--arith",
            config.arith, "--offline", config.offline]


def _run_parties(spec: dict[str, Any], config: ShareConfig, timeout_s: float | None
                 ) -> tuple[dict[str, Any] | None, dict[str, float | None], dict[str, str]]:
    """The helper and model daemons and a user process for one length: (the user's result, each party's peak
    memory, each party's failure)."""
    peaks: dict[str, float | None] = {"model": None, "helper": None}
    errors: dict[str, str] = {}
    user = None
    with tempfile.TemporaryDirectory(prefix="permllm-scaling-") as tmp:
        daemons: list[_Daemon] = []
        try:
            for role in ("helper", "model"):
                args = _share_flags(config)
                if role == "model":
                    args += ["--helper", daemons[0].addr, "--model", spec["model"]]
                d = _Daemon(role, args, Path(tmp) / f"{role}.log")
                daemons.append(d)
                why = d.wait_ready(READY_TIMEOUT_S if timeout_s is None else timeout_s)
                if why is not None:
                    errors[role] = why
                    return None, peaks, errors
            helper, model = daemons
            user, why = _run_stage("user", {**spec, "model_party": model.addr, "helper": helper.addr}, timeout_s)
            if why is not None:
                errors["user"] = why
            for d in daemons:
                peaks[d.role] = d.peak()
        finally:
            for d in daemons:  # both drain at once
                why = d.terminate()
                if why is not None:
                    errors.setdefault(d.role, why)
            for d in daemons:
                d.wait()
    return user, peaks, errors


def _measure(model: str, length: int, reps: int, transport: str, config: ShareConfig,
             timeout_s: float | None) -> dict[str, Any]:
    """One prompt length: the plaintext, embedded and three-process stages, each in fresh processes."""
    reps = reps if length <= LONG else 1  # a long prefill is timed once
    spec = {"model": model, "length": length, "reps": reps, "transport": transport,
            "config": dataclasses.asdict(config)}
    errors: dict[str, str] = {}
    results: dict[str, dict[str, Any] | None] = {}
    for stage in ("plaintext", "embedded"):
        results[stage], why = _run_stage(stage, spec, timeout_s)
        if why is not None:
            errors[stage] = why
    results["parties"], party_peaks, party_errors = _run_parties(spec, config, timeout_s)
    errors.update(party_errors)
    plain, emb, user = results["plaintext"], results["embedded"], results["parties"]
    first = {k: (r or {}).get("first_token") for k, r in results.items()}
    private = [t for k, t in first.items() if k != "plaintext" and t is not None]
    return {
        "prompt_len": length, "ttft_reps": reps,
        "ttft_ms": emb and emb["ttft_ms"], "plaintext_ttft_ms": plain and plain["ttft_ms"],
        "parties_ttft_ms": user and user["ttft_ms"],
        "prefill_online_bytes": emb and emb["prefill_online_bytes"],
        "peak_rss_mb": {"model": party_peaks["model"], "user": user and user["peak_rss_mb"],
                        "helper": party_peaks["helper"], "embedded": emb and emb["peak_rss_mb"],
                        "plaintext": plain and plain["peak_rss_mb"]},
        "first_token": first,
        "first_token_identical": (all(t == first["plaintext"] for t in private)
                                  if private and first["plaintext"] is not None else None),
        "errors": errors,
    }


def bench_scaling(model: str, lengths: list[int], *, reps: int = TTFT_REPS, transport: str = "tcp",
                  config: ShareConfig | None = None, timeout_s: float | None = None,
                  progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Time to first token (private and plaintext), prefill online bytes, each party's peak memory and the
    first token's agreement with transformers, per prompt length, each length in fresh processes.

    ``model``: a named model or an HF directory; ``transport``: the embedded parties' links;
    ``timeout_s``: the limit of each process (None: none); ``progress`` gets each length's row.
    """
    config = config or ShareConfig()
    rows = []
    for length in lengths:
        rows.append(_measure(model, length, reps, transport, config, timeout_s))
        if progress is not None:
            progress(rows[-1])
    return {"target": model, "prompt_lens": list(lengths), "ttft_reps": reps, "transport": transport,
            "config": dataclasses.asdict(config), "scaling": rows}


def _cell(v: float | None, fmt: str = "{:,.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def format_scaling(report: dict[str, Any]) -> str:
    """The report as a text table, one row per prompt length, then the errors."""
    head = ("prompt", "TTFT ms", "plain ms", "ratio", "3-proc ms", "prefill MB", "RSS M", "RSS U", "RSS H",
            "RSS emb", "RSS plain", "1st token")
    lines = ["  ".join(f"{h:>10}" for h in head)]
    errs = []
    for r in report["scaling"]:
        rss = r["peak_rss_mb"]
        ratio = r["ttft_ms"] / r["plaintext_ttft_ms"] if r["ttft_ms"] and r["plaintext_ttft_ms"] else None
        same = {True: "identical", False: "DIFFERS", None: "-"}[r["first_token_identical"]]
        mb = r["prefill_online_bytes"] and r["prefill_online_bytes"] / 1e6
        cells = (str(r["prompt_len"]), _cell(r["ttft_ms"]), _cell(r["plaintext_ttft_ms"]), _cell(ratio, "{:.1f}x"),
                 _cell(r["parties_ttft_ms"]), _cell(mb, "{:,.1f}"), *(_cell(rss[k]) for k in PARTIES), same)
        lines.append("  ".join(f"{c:>10}" for c in cells))
        errs += [f"  prompt {r['prompt_len']}, {stage}: {why}" for stage, why in r["errors"].items()]
    lines.append("(TTFT: embedded, median of %d; 3-proc: one prefill, three processes; RSS: peak MB per process)"
                 % report["ttft_reps"])
    return "\n".join(lines + (["errors:", *errs] if errs else []))


def plot_scaling(report: dict[str, Any], path: str) -> None:
    """Write a PNG: time to first token (private and plaintext), prefill online MB and each process's peak
    memory against the prompt length, one panel each (a failed length leaves a gap)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["scaling"]
    x = [r["prompt_len"] for r in rows]

    def line(ax: Any, ys: list[float | None], **kw: Any) -> None:
        ax.plot(x, [np.nan if y is None else y for y in ys], marker="o", **kw)

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.5))
    line(a1, [r["ttft_ms"] for r in rows], label="private, embedded")
    line(a1, [r["parties_ttft_ms"] for r in rows], label="private, three processes", linestyle="--")
    line(a1, [r["plaintext_ttft_ms"] for r in rows], label="plaintext (transformers)")
    a1.set_ylabel("ms")
    a1.set_yscale("log")
    a1.set_title("time to first token")
    line(a2, [r["prefill_online_bytes"] and r["prefill_online_bytes"] / 1e6 for r in rows], color="#228833")
    a2.set_ylabel("MB (all parties)")
    a2.set_title("prefill online traffic")
    for k in PARTIES:
        line(a3, [r["peak_rss_mb"][k] for r in rows], label=k, linestyle=":" if k == "plaintext" else "-")
    a3.set_ylabel("MB")
    a3.set_title("peak RSS per process")
    for ax in (a1, a2, a3):
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("prompt length (tokens)")
        ax.grid(alpha=0.3)
    a1.legend()
    a3.legend()
    fig.suptitle(f"{report['target']}: scaling with the prompt length")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run one stage (``STAGE SPEC_JSON``) and print its result as one JSON line."""
    stage, spec = argv if argv is not None else sys.argv[1:]
    fn = STAGES[stage]
    out = asyncio.run(fn(json.loads(spec))) if inspect.iscoroutinefunction(fn) else fn(json.loads(spec))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
