"""``permllm bench … --speculate``: decoding vs speculative decoding at each emulated RTT, in one session.

On a random 2-layer LLaMA with SmolLM2-Instruct's tokenizer (the bench's prompts need one): every run
gives transformers' greedy ids, the hop counts do not depend on the network (equal at every RTT),
the emulated RTT really delays every hop, and the CLI prints the table.
"""
from __future__ import annotations

import pytest

from permllm.cli import main
from permllm.runtime.spec_bench import PROMPTS, bench_speculate, format_speculate

from .test_openai_server import _tiny_chat_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _tiny_chat_llama(tmp_path_factory.mktemp("specbench") / "tiny")


async def test_bench_rows_at_two_rtts(tiny):
    r = await bench_speculate(str(tiny), draft_tokens=0, rtts=[0.0, 10.0], tokens=6, per_kind=1)
    rows = {(row["rtt_ms"], row["kind"]): row for row in r["rows"]}
    assert set(rows) == {(rtt, k) for rtt in (0.0, 10.0) for k in PROMPTS}
    assert r["drafter"] == "PromptLookup" and r["draft_tokens"] == "auto" and r["route"] == "8"
    for (rtt, kind), row in rows.items():
        d, s = row["decode"], row["speculate"]
        assert d["ids_identical"] and s["ids_identical"], (rtt, kind)
        assert row["tokens"] >= 1 and s["passes"] >= 1 and 0 <= s["accepted"] <= s["drafted"]
        lan = rows[(0.0, kind)]  # the hops do not depend on the network
        assert (d["hops_per_token"], s["hops_per_token"]) == (lan["decode"]["hops_per_token"],
                                                              lan["speculate"]["hops_per_token"])
        assert d["hops_per_token"] == 8 * 2 + 8  # a decode step on the fused op: 8 hops a layer and 8 more
        if rtt:  # every dependent hop waits half the RTT
            assert d["online_s_per_token"] >= d["hops_per_token"] * rtt / 2000
            assert s["online_s_per_token"] >= s["hops_per_token"] * rtt / 2000
    table = format_speculate(r)
    assert table.count("\n| 10 | ") == 2 and "**no**" not in table


def test_cli_refuses_what_the_speculation_bench_cannot_run(capsys):
    with pytest.raises(SystemExit, match="--speculate goes with smollm2 or gemma3-270m"):
        main(["bench", "chatglm6b-layer", "--speculate", "prompt-lookup"])
    with pytest.raises(SystemExit, match="a list of round-trip times goes with --speculate"):
        main(["bench", "smollm2", "--rtt", "0,10"])
    assert main(["bench", "smollm2", "--speculate", "draft"]) == 2  # no --draft: a clear error
    assert "speculate = 'draft' needs draft" in capsys.readouterr().err
    assert main(["bench", "smollm2", "--speculate", "prompt-lookup", "--kinds", "copy,quote"]) == 2
    assert "kinds of prompt: some of copy, open, got copy, quote" in capsys.readouterr().err
