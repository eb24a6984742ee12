"""The ``permllm`` command line."""
from __future__ import annotations

import argparse
import json
import sys

__all__ = ["main"]


def _demo(args: argparse.Namespace) -> int:
    from .net import run
    from .runtime.opsdemo import format_report, op_report

    rows = []
    for dtype in args.dtype:
        rows += run(op_report(dtype, args.transport))
    if args.json:
        print(json.dumps(rows))
    else:
        print("Each op run by model, user and helper over the", args.transport,
              "transport, checked against plaintext:\n")
        print(format_report(rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``permllm`` console script."""
    ap = argparse.ArgumentParser(prog="permllm", description="Private LLM inference (PermLLM).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="run every protocol op with all three parties and compare with plaintext")
    d.add_argument("--transport", choices=["memory", "tcp"], default="tcp")
    d.add_argument("--dtype", nargs="+", choices=["float64", "float32"], default=["float64", "float32"])
    d.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    d.set_defaults(fn=_demo)
    args = ap.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
