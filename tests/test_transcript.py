"""Audit transcripts: what each party received, and whether what should be uniform is."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

import permllm
from permllm.model import load_model
from permllm.protocols.transcript import Transcript, audit

from .test_generation import _llama_dir, hf_greedy


async def test_a_generation_transcript_lists_every_array_and_passes_the_audit(tmp_path):
    d, hf = _llama_dir(tmp_path)
    lm = load_model(str(d))
    prompt = [5, 17, 42, 99, 123, 250, 7, 3]
    out = tmp_path / "transcript"
    async with await permllm.local(lm, transcript=out) as s:
        ids = [t async for t in s.generate_ids(prompt, 6)]
    assert ids == hf_greedy(hf, prompt, 6)
    report = audit(out)
    assert set(report) == {"model", "user", "helper"}
    index = {role: json.loads((out / role / "index.json").read_text()) for role in report}
    for role, entries in index.items():
        assert all((out / role / e["file"]).is_file() for e in entries)
        assert all(set(e) == {"file", "from", "tag", "modulus", "kind"} for e in entries)
    # The model party's uniform arrays: the ring lookup's messages (bytes: 256) and U's shifted index (the vocabulary).
    m_uniform = {(e["from"], e["tag"][0], e["modulus"]) for e in index["model"] if e["kind"] == "uniform"}
    assert {("user", "embed", 256), ("helper", "embed", 256), ("helper", "lift", 256), ("user", "pir", 300)} <= m_uniform
    u_uniform = {(e["from"], e["tag"][0]) for e in index["user"] if e["kind"] == "uniform"}
    assert {("model", "setup"), ("helper", "pir"), ("model", "pir")} <= u_uniform
    assert not index["helper"]  # H receives the seeds (bytes) and public metadata only
    tested = [t for r in report.values() for g in ("uniformity", "repeats") for t in r[g].values()
              if t["pass"] is not None]
    assert tested and all(t["pass"] for t in tested), report
    assert any(k.startswith("user:embed/") for k in report["model"]["repeats"])  # the one-hot, token after token
    # What U unmasks by design (the permuted reveals, the lift) is listed as revealed, not as uniform.
    assert {e["tag"][0] for e in index["user"] if e["kind"] == "revealed"} >= {"perm", "lift"}


def test_the_audit_fails_a_biased_array_and_a_missing_mask(tmp_path):
    rng = np.random.default_rng(0)

    def transcript(onehot_rows):
        t = Transcript(tmp_path, "model")
        for i, row in enumerate(onehot_rows):
            t.record("user", ("embed", "x", i, "x"), row, 256)
        t.record("user", ("pir", "id", 0, "index"), 7, 300)
        t.record("user", ("linear", "L0", 0, "u"), rng.normal(size=10), None)
        t.record("model", ("perm", "n1", 0, "m"), [rng.normal(size=4)], None, revealed=True)
        t.close()
        return audit(tmp_path)["model"]

    good = transcript([rng.integers(0, 256, size=(300, 4), dtype=np.uint8) for _ in range(8)])
    assert good["counts"] == {"uniform": 9, "revealed": 1, "statistical": 1}
    assert good["uniformity"]["user:embed"]["pass"] and good["uniformity"]["user:pir"]["pass"] is None
    assert all(t["pass"] for t in good["repeats"].values())
    biased = transcript([(rng.integers(0, 256, size=(300, 4)) // 2).astype(np.uint8) for _ in range(8)])
    assert biased["uniformity"]["user:embed"]["pass"] is False
    # One position without its mask (the same byte every token): marginally near-uniform, caught by the repeats.
    rows = [rng.integers(0, 256, size=(300, 4), dtype=np.uint8) for _ in range(8)]
    for r in rows:
        r[5, 0] = 1
    missing = transcript(rows)
    assert missing["uniformity"]["user:embed"]["pass"] and not missing["repeats"]["user:embed/x/x:(300, 4)"]["pass"]
    run = subprocess.run([sys.executable, "-m", "permllm.cli", "audit", str(tmp_path)], capture_output=True, text=True)
    assert run.returncode == 1 and '"pass": false' in run.stdout
