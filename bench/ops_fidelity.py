"""Per-op online cost and fidelity: messages, hops, bytes and max error vs plaintext.

Runs every protocol op with all three parties (SmolLM2-like shapes) in float64 at
R = 2^12, over loopback TCP. Usage:

    .venv/bin/python bench/ops_fidelity.py [--json] [--transport memory|tcp]
"""
from __future__ import annotations

import argparse
import json

from permllm.net import run
from permllm.runtime.opsdemo import format_report, op_report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--transport", default="tcp", choices=["memory", "tcp"])
    a = ap.parse_args()
    rows = run(op_report("float64", a.transport))
    print(json.dumps(rows, indent=1) if a.json else format_report(rows))


if __name__ == "__main__":
    main()
