"""The scaling bench (``permllm bench MODEL --prompt-len L1,L2``) on a small random LLaMA: every stage in
its own processes (transformers, the embedded trio, the helper and model daemons and a user over loopback
TCP), a real peak memory per process, and a length that fails reported as that length's error."""
from __future__ import annotations

import json

import pytest

from permllm.runtime.bench import prompt_ids
from permllm.runtime.scaling import PARTIES, bench_scaling, format_scaling, plot_scaling

from .test_generation import _llama_dir, hf_greedy


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _llama_dir(tmp_path_factory.mktemp("scaling"))  # context 64, vocab 300, no tokenizer


def test_two_lengths(llama, tmp_path):
    d, hf = llama
    r = bench_scaling(str(d), [8, 16], reps=1, timeout_s=120)
    json.dumps(r)  # the --json report
    assert r["prompt_lens"] == [8, 16] and [row["prompt_len"] for row in r["scaling"]] == [8, 16]
    for row in r["scaling"]:
        assert row["errors"] == {}
        assert set(row["peak_rss_mb"]) == set(PARTIES) and all(v > 0 for v in row["peak_rss_mb"].values())
        assert row["ttft_ms"] > 0 and row["plaintext_ttft_ms"] > 0 and row["parties_ttft_ms"] > 0
        assert row["prefill_online_bytes"] > 0
        want = hf_greedy(hf, prompt_ids(None, 300, row["prompt_len"]), 1)[0]  # transformers, in this process
        assert row["first_token"] == {"plaintext": want, "embedded": want, "parties": want}
        assert row["first_token_identical"] is True
    # the prefill's traffic grows with the prompt
    assert r["scaling"][1]["prefill_online_bytes"] > r["scaling"][0]["prefill_online_bytes"]
    table = format_scaling(r)
    assert "identical" in table and "errors" not in table
    plot_scaling(r, str(tmp_path / "scaling.png"))
    assert (tmp_path / "scaling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_failed_length_is_reported(llama):
    """A prompt that does not fit the context (64 + 1 > 64): the private stages fail with the reason, the
    plaintext one and the daemons still report, and nothing raises."""
    d, _ = llama
    [row] = bench_scaling(str(d), [64], reps=1, timeout_s=120)["scaling"]
    assert set(row["errors"]) == {"embedded", "user"}
    assert all("ContextTooLong" in why and "context of 64 tokens" in why for why in row["errors"].values())
    assert row["ttft_ms"] is None and row["plaintext_ttft_ms"] > 0 and row["first_token_identical"] is None
    rss = row["peak_rss_mb"]
    assert rss["embedded"] is None and rss["user"] is None and rss["model"] > 0 and rss["helper"] > 0
    assert "prompt 64, embedded: exit status 1" in format_scaling({"ttft_reps": 1, "scaling": [row]})
