"""Latency profiler: aggregate per-op records into tables and a chart.

Turn tracing on for the parties of a session (:func:`enable`), run a generation, then
:func:`summarize` the :class:`~permllm.protocols.party.OpRecord` list per op kind,
per layer and per token, :func:`format_table` it, and :func:`plot` a PNG: per-layer
online time split into compute, waiting for the peer and (with link emulation)
transfer, and bytes per op kind.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable

from ..net import LinkEmulator
from ..protocols.party import OpRecord, Party

__all__ = ["enable", "summarize", "format_table", "plot", "op_kind", "Summary"]

_LAYER = re.compile(r"^L(\d+)\.(.+)$")
KINDS = {"n1": "norm", "n2": "norm", "qkv": "linear", "o": "linear", "mlp_in": "linear", "mlp_out": "linear",
         "res_in": "linear", "res_post": "linear", "s": "q·Kᵀ", "att": "P·V", "p": "softmax", "act": "activation",
         "att8": "attention (8-hop)", "qkn": "norm", "na": "norm", "nf": "norm", "qn": "linear", "kn": "linear", "post_attn": "linear",
         "post_ff": "linear"}


def enable(parties: Iterable[Party]) -> list[list[OpRecord]]:
    """Start recording ops at these parties; returns their (live) record lists."""
    out = []
    for p in parties:
        p.trace = [] if p.trace is None else p.trace
        out.append(p.trace)
    return out


def op_kind(name: str) -> tuple[int | None, str]:
    """(layer or None, kind) of an op name such as ``L3.qkv`` or ``select``."""
    m = _LAYER.match(name)
    if m:
        return int(m.group(1)), KINDS.get(m.group(2), m.group(2))
    return None, {"embed": "embedding", "final.n": "norm", "final": "linear", "logits": "linear",
                  "select": "token selection"}.get(name, name)


@dataclass
class Cell:
    """Totals of a group of op records."""

    n: int = 0
    wall_s: float = 0.0
    wait_s: float = 0.0
    transfer_s: float = 0.0
    bytes_sent: int = 0
    bytes_recv: int = 0
    msgs_sent: int = 0
    msgs_recv: int = 0
    hops: int = 0

    @property
    def compute_s(self) -> float:
        return max(self.wall_s - self.wait_s, 0.0)

    def add(self, r: OpRecord, link: LinkEmulator | None) -> None:
        self.n += 1
        self.wall_s += r.wall_s
        self.wait_s += r.wait_s
        if link is not None and r.msgs_recv:
            est = r.msgs_recv * link.delay_s + (8 * r.bytes_recv / link.bandwidth_bps if link.bandwidth_bps else 0)
            self.transfer_s += min(est, r.wait_s)
        self.bytes_sent += r.bytes_sent
        self.bytes_recv += r.bytes_recv
        self.msgs_sent += r.msgs_sent
        self.msgs_recv += r.msgs_recv
        self.hops += r.hops


@dataclass
class Summary:
    """Records grouped per (party, phase, kind), per (party, phase, layer) and per (party, phase, token)."""

    by_kind: dict[tuple[str, str, str], Cell] = field(default_factory=lambda: defaultdict(Cell))
    by_layer: dict[tuple[str, str, int], Cell] = field(default_factory=lambda: defaultdict(Cell))
    by_token: dict[tuple[str, str, int], Cell] = field(default_factory=lambda: defaultdict(Cell))


def summarize(records: Iterable[OpRecord], link: LinkEmulator | None = None) -> Summary:
    s = Summary()
    for r in records:
        layer, kind = op_kind(r.name)
        s.by_kind[(r.party, r.phase, kind)].add(r, link)
        if layer is not None:
            s.by_layer[(r.party, r.phase, layer)].add(r, link)
        s.by_token[(r.party, r.phase, r.token)].add(r, link)
    return s


def format_table(s: Summary, phase: str = "online") -> str:
    """Per op kind, per party: calls, wall/compute/wait ms, bytes sent/received, messages, hops."""
    head = (f"{'party':<7}{'op kind':<17}{'calls':>6}{'wall ms':>10}{'compute':>10}{'wait':>10}{'transfer':>10}"
            f"{'sent MB':>9}{'recv MB':>9}{'msgs':>6}{'hops':>6}")
    lines = [f"phase: {phase}", head, "-" * len(head)]
    for (party, ph, kind), c in sorted(s.by_kind.items(), key=lambda kv: (kv[0][0], -kv[1].wall_s)):
        if ph != phase:
            continue
        lines.append(f"{party:<7}{kind:<17}{c.n:>6}{1e3 * c.wall_s:>10.1f}{1e3 * c.compute_s:>10.1f}"
                     f"{1e3 * c.wait_s:>10.1f}{1e3 * c.transfer_s:>10.1f}{c.bytes_sent / 1e6:>9.2f}"
                     f"{c.bytes_recv / 1e6:>9.2f}{c.msgs_sent:>6}{c.hops:>6}")
    return "\n".join(lines)


def plot(s: Summary, path: str, party: str = "model", phase: str = "online", title: str = "") -> None:
    """Write a PNG: per-layer time (compute / waiting / transfer) and bytes per op kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(k[2] for k in s.by_layer if k[0] == party and k[1] == phase)
    cells = [s.by_layer[(party, phase, i)] for i in layers]
    comp = [1e3 * c.compute_s for c in cells]
    trans = [1e3 * c.transfer_s for c in cells]
    wait = [1e3 * (c.wait_s - c.transfer_s) for c in cells]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.5))
    ax1.bar(layers, comp, label="compute", color="#4477aa")
    ax1.bar(layers, wait, bottom=comp, label="waiting for peer", color="#ee6677")
    ax1.bar(layers, trans, bottom=[a + b for a, b in zip(comp, wait)], label="transfer (link model)", color="#ccbb44")
    ax1.set_xlabel("layer")
    ax1.set_ylabel("ms (summed over tokens)")
    ax1.set_title(f"{party} party, {phase} time per layer")
    ax1.legend()
    kinds = [(k[2], c) for k, c in s.by_kind.items() if k[1] == phase]
    agg: dict[str, float] = defaultdict(float)
    for kind, c in kinds:
        agg[kind] += c.bytes_sent / 1e6
    names = sorted(agg, key=agg.get, reverse=True)  # type: ignore[arg-type]
    ax2.barh(names, [agg[n] for n in names], color="#228833")
    ax2.set_xlabel("MB sent (all parties)")
    ax2.set_title(f"{phase} bytes per op kind")
    ax2.invert_yaxis()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
