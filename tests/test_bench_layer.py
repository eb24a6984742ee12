"""``permllm bench chatglm6b-layer``'s code path at a small shape: the private layer against the plaintext one on
the ring (both routes) and on real numbers, the per-token accounting, the edges' lookup bytes, and the overflow
error where a published bound is too small."""
from __future__ import annotations

import pytest

from permllm.model.chatglm_ref import ChatGLMConfig
from permllm.model.forward import RingPlan
from permllm.protocols import ShareConfig
from permllm.protocols.ring import RingOverflow
from permllm.runtime import local_trio
from permllm.runtime.bench import _lookup_bytes, bench_chatglm_layer

SMALL = ChatGLMConfig(vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, max_positions=64)


@pytest.mark.parametrize("arith,route", [("ring", "8"), ("ring", "12"), ("float", "12")])
async def test_layer_bench_matches_the_plaintext_layer(arith, route):
    r = await bench_chatglm_layer(tokens=3, prompt_len=6, arith=arith, route=route, cfg=SMALL)
    assert (r["arith"], r["route"], r["hops_per_layer"]) == (arith, route, int(route))
    # the ring's error is its fixed-point rounding (a = 14 fractional bits at the norms, times ChatGLM's α ≈ 2)
    tol = 1e-3 if arith == "ring" else 1e-6
    assert 0 < r["prefill_max_abs_err"] < tol and 0 < r["decode_max_abs_err"] < tol and r["output_max_abs"] > 1
    if arith == "ring":
        plan = RingPlan.from_list(r["plan"])
        assert plan.wide  # the small random weights' chains need the wide ring's attention block
        # U's reshare of the activation travels in the bytes its consumers need (mlp_out, then the next norm's input)
        assert plan.s_bits < 64
        assert r["online_bytes_per_layer_by_message"]["activation: unperm.y"] == SMALL.ffn * plan.s_bits // 8
    edges = r["online_bytes_edges"]
    assert set(edges) == {"embedding", "final_norm", "token_selection"} and min(edges.values()) > 0
    assert r["online_bytes_per_token"] == pytest.approx(SMALL.num_layers * r["online_bytes_per_layer"]
                                                        + sum(edges.values()))
    by_op = r["online_bytes_per_layer_by_op"]
    assert by_op["linear"] == 0 and sum(by_op.values()) < r["online_bytes_per_layer"]  # payloads, without frames
    assert sum(r["online_bytes_per_layer_by_message"].values()) == pytest.approx(sum(by_op.values()))


async def test_lookup_bytes_from_small_tables_equal_the_whole_tables():
    """The edges' lookup is measured on three small tables and combined: that equals the lookup in the whole one."""
    async with await local_trio("tcp", ShareConfig(arith="ring")) as trio:
        whole = await _lookup_bytes(trio, 300, 64, 24, small=300)  # B(V, V) + B(V, h) − B(V, V): measured whole
        assert await _lookup_bytes(trio, 300, 64, 24) == whole and whole[0] > 4 * 300


async def test_layer_bench_stops_where_a_value_leaves_its_bound(monkeypatch):
    """Published score bounds 64× too small: the plan fits them, the real scores do not, and U's decode says so."""
    import permllm.model as model

    real = model.public_bounds

    def small(mags, *a, **kw):
        return {k: (v / 64 if k == "L0.s" else v) for k, v in real(mags, *a, **kw).items()}

    monkeypatch.setattr(model, "public_bounds", small)
    with pytest.raises(RingOverflow, match=r"L0\.p"):
        await bench_chatglm_layer(tokens=1, prompt_len=6, arith="ring", route="12", cfg=SMALL)
