"""What the model party can learn of a token id from the embedding lookup's last hop (SmolLM2).

The ring part of the lookup hands M only uniform values. Its last hop, the lift into the
layers' real-number shares, is a reshare-unpermute: M receives U's y′ − a′ (which M can
un-permute: it drew π) and the helper's γ = π⁻¹(a′) − b′, with a′ and b′ uniform of width
R·mag (mag: the public bound of the lookup). So M holds o₁ = E[id] − A and o₂ = A − B for
uniform A, B. This bench runs the exact consistency attack on that view: the ids v with
|E[v] − o₁| ≤ w/2 and |E[v] − o₁ − o₂| ≤ w/2 in every coordinate are those M cannot rule
out, and log₂(V / their number) is what it learned. It models M's view with the
protocol's mask distributions; it does not run the protocol.

    .venv/bin/python bench/lookup_leak.py [--lookups 400]
"""
from __future__ import annotations

import argparse
import asyncio
import math

import numpy as np

from permllm.model import calibrate, load_model
from permllm.protocols import DEFAULT_RATIO


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lookups", type=int, default=400)
    args = ap.parse_args()
    lm = load_model("smollm2")
    E = np.asarray(lm.weights["embed"], dtype=np.float64)
    mag = float(asyncio.run(calibrate(lm.weights))["embed"])
    w = DEFAULT_RATIO * mag
    rng = np.random.default_rng(1)
    V, d = E.shape
    bits = []
    for _ in range(args.lookups):
        i = int(rng.integers(V))
        A, B = rng.uniform(-w / 2, w / 2, d), rng.uniform(-w / 2, w / 2, d)
        o1, o2 = E[i] - A, A - B
        ok = np.all(np.abs(E - o1) <= w / 2, axis=1) & np.all(np.abs(E - o1 - o2) <= w / 2, axis=1)
        bits.append(math.log2(V / ok.sum()))
    b = np.asarray(bits)
    print(f"public bound {mag}, R = {DEFAULT_RATIO:.0f}: {len(b)} lookups, mean {b.mean():.4f} bits of the id "
          f"per lookup, {np.mean(b > 0):.1%} of lookups rule some id out, at most {b.max():.2f} bits")


if __name__ == "__main__":
    main()
